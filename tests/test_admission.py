"""Prompt encoding at admission, with and without the tokenizer's chat template."""

from __future__ import annotations

import pytest

from learner.admission import encode_prompt
from pipeline.errors import ConfigError
from toy.kit import build_tokenizer


def test_chat_template_gives_token_ids_whatever_transformers_returns() -> None:
    """transformers 5 returns a BatchEncoding from apply_chat_template (iterating it gave the
    dict's keys, and the learner crashed at its first prompt)."""
    tok = build_tokenizer()
    plain = encode_prompt(tok, "12+3", chat_template=False)
    assert plain == tok("12+3")["input_ids"] and all(isinstance(i, int) for i in plain)
    with pytest.raises(ConfigError, match="has no chat template"):
        encode_prompt(tok, "12+3", chat_template=True)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}="
    templated = encode_prompt(tok, "12+3", chat_template=True)
    assert templated == tok("12+3=")["input_ids"]
    assert all(isinstance(i, int) for i in templated)


def test_prompts_longer_than_the_limit_are_skipped_and_counted(redis_server) -> None:  # type: ignore[no-untyped-def]
    """With max_prompt_tokens, admission skips (counts, logs) the dataset items whose prompt is
    too long and admits the rest in order; nothing too long reaches the prompts stream."""
    import asyncio

    from learner.admission import Admission
    from learner.metrics import LearnerMetrics
    from learner.state import LearnerState
    from pipeline.config import LearnerOptions, LearnerSettings, RedisSettings, RunSettings
    from pipeline.treepo.tasks import Problem
    from pipeline.wire.messages import PromptTask, decode_as
    from tests.helpers import make_streams

    tok = build_tokenizer()
    problems = [
        Problem(p, "1", "arith") for p in ("1+2", "12+34+56+78", "3+4", "123+456+789+1", "5+6")
    ]
    settings = LearnerSettings(
        redis=RedisSettings(url=redis_server.url),
        run=RunSettings(name="test", max_staleness=0),
        learner=LearnerOptions(batch_prompts=3, max_prompt_tokens=5, shuffle=False),
    )
    assert [len(encode_prompt(tok, p.prompt, False)) <= 5 for p in problems] == [
        True, False, True, False, True
    ]  # fmt: skip

    async def main() -> tuple[LearnerState, list[str], float]:
        streams = make_streams(redis_server)
        metrics = LearnerMetrics()
        state = LearnerState()
        await Admission(settings, streams, metrics, tok, problems).admit(state)
        entries = await streams.client.xrange(streams.keys.prompts)
        sent = [decode_as(f[b"m"], PromptTask).prompt_id for _, f in entries]
        await streams.close()
        return state, sent, metrics.prompts_too_long._value.get()

    state, sent, skipped = asyncio.run(main())
    assert sent == ["q0", "q2", "q4"] and sorted(state.ledger.outstanding) == sent
    assert state.cursor == 5 and skipped == 2


def test_each_epoch_visits_every_item_in_its_own_seeded_order() -> None:
    from learner.admission import EpochOrder

    n = 50
    order = EpochOrder(n, seed=3, shuffle=True)
    epochs = [[order.item(pos) for pos in range(e * n, (e + 1) * n)] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # every item once per epoch
    assert epochs[0] != list(range(n)) and epochs[0] != epochs[1] != epochs[2]
    # a function of the position: a fresh object (a resumed learner) agrees, in any order
    again = EpochOrder(n, seed=3, shuffle=True)
    assert [again.item(p) for p in (120, 7, 61)] == [epochs[2][20], epochs[0][7], epochs[1][11]]
    assert [EpochOrder(n, seed=4, shuffle=True).item(p) for p in range(n)] != epochs[0]
    assert [EpochOrder(n, seed=3, shuffle=False).item(p) for p in range(60)] == [
        *range(n),
        *range(10),
    ]


def test_prompt_template_and_system_prompt() -> None:
    """The dataset prompt goes in at {prompt}; \\boxed{} and other braces stay as written; the
    system message reaches the chat template; without one, a system prompt is refused."""
    from pipeline.config import LearnerOptions

    tok = build_tokenizer()
    template = "Q: {prompt} \\boxed{}"
    assert encode_prompt(tok, "1+2", False, template) == tok("Q: 1+2 \\boxed{}")["input_ids"]
    with pytest.raises(ConfigError, match=r"SYSTEM_PROMPT needs .*CHAT_TEMPLATE=true"):
        encode_prompt(tok, "1+2", False, system="be brief")
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}="
    ids = encode_prompt(tok, "1+2", True, template, system="S")
    assert tok.decode(ids) == tok.decode(tok("[system]S[user]Q: 1+2 \\boxed{}=")["input_ids"])
    with pytest.raises(ValueError, match="prompt_template"):
        LearnerOptions(prompt_template="no placeholder")


def test_a_lost_prompt_is_admitted_again_while_trees_wait_unread(redis_server) -> None:  # type: ignore[no-untyped-def]
    """A prompt whose entry is gone (lost) is admitted again once overdue; while trees wait
    unread on the stream (samplers ahead of the learner, as they stay) only once overdue twice
    over, not never."""
    import asyncio
    import time

    from learner.admission import Admission
    from learner.metrics import LearnerMetrics
    from learner.state import LearnerState, Resolved
    from pipeline.config import LearnerOptions, LearnerSettings, RedisSettings, RunSettings
    from pipeline.treepo.tasks import Problem
    from pipeline.wire.messages import RolloutLeaf, RolloutNode, TreeRollout
    from pipeline.wire.streams import PROMPT_GROUP, TREE_GROUP
    from tests.helpers import make_streams

    after = 100.0
    settings = LearnerSettings(
        redis=RedisSettings(url=redis_server.url),
        run=RunSettings(name="test"),
        learner=LearnerOptions(batch_prompts=2, shuffle=False, readmit_after_s=after),
    )
    problems = [Problem(f"{i}+1", str(i + 1), "arith") for i in range(4)]

    async def check(admission: Admission, state: LearnerState, age: float, lag: bool) -> list[str]:
        s = admission.streams
        await s.client.delete(s.keys.prompts, s.keys.trees)
        await s.ensure_group(s.keys.prompts, PROMPT_GROUP)
        await s.ensure_group(s.keys.trees, TREE_GROUP)
        if lag:  # a tree published and not yet read by the learner
            tree = TreeRollout(
                [1, 2],
                [RolloutNode(-1, [3], [-0.1], 0)],
                [RolloutLeaf(0, 1.0, "eos")],
                tree_id="t-other",
                prompt_id="other",
            )
            await s.publish(s.keys.trees, tree)
        state.ledger.admit("lost", 0, "1-1", time.time() - age)  # its entry is not in the stream
        admission.last_overdue_check = 0.0
        since = Resolved()
        await admission.readmit_overdue(state, since, set())
        readmitted = list(since.readmitted)
        state.ledger.outstanding.clear()
        return readmitted

    async def main() -> list[list[str]]:
        streams = make_streams(redis_server)
        admission = Admission(settings, streams, LearnerMetrics(), build_tokenizer(), problems)
        state = LearnerState()
        try:
            return [
                await check(admission, state, 1.5 * after, lag=False),
                await check(admission, state, 1.5 * after, lag=True),
                await check(admission, state, 2.5 * after, lag=True),
                await check(admission, state, 0.5 * after, lag=False),
            ]
        finally:
            await streams.close()

    assert asyncio.run(main()) == [["lost"], [], ["lost"], []]
