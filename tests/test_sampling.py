"""TreePO tree sampling against scripted generators: budget, branching, ends, fallback, stats."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.config import TreeConfig
from pipeline.messages import TreeRollout
from pipeline.rewards import last_boxed
from pipeline.sampling import (
    GeneratedSegment,
    SegmentGenerator,
    SegmentRequest,
    TreeSampler,
    repeats_tail,
)
from tests.scripted import BOX_CLOSE, BOX_OPEN, EOS, ScriptedGenerator, decode, fingerprint


def grow(
    gen: ScriptedGenerator, cfg: TreeConfig, prompts: list[list[int]], seed: int = 0
) -> list[TreeRollout]:
    return asyncio.run(TreeSampler(gen, cfg, rng=seed, decode=decode).expand(prompts))


def check_tree(tree: TreeRollout, cfg: TreeConfig) -> None:
    """Every invariant of TREEPO.md section 1 that can be read off one finished tree."""
    nodes = tree.nodes
    parents = {n.parent for n in nodes}
    leaf_nodes = [leaf.node for leaf in tree.leaves]
    assert len(leaf_nodes) == len(set(leaf_nodes))
    assert len(tree.leaves) <= cfg.width
    if cfg.fallback:
        assert len(tree.leaves) == cfg.width
    # leaves are exactly the childless nodes
    assert set(leaf_nodes) == {i for i in range(len(nodes)) if i not in parents}
    depth = [0] * len(nodes)
    for i, n in enumerate(nodes):
        assert -1 <= n.parent < i
        depth[i] = 1 if n.parent == -1 else depth[n.parent] + 1
        assert tree.depth(i) == depth[i] <= cfg.max_depth
        assert len(n.token_ids) == len(n.logprobs)
        tokens = n.token_ids.tolist()
        # generated under exactly prompt + its own path (fallback contexts included)
        if tokens and tokens[0] != EOS:
            context = tree.prompt_token_ids.tolist() + tree.response_tokens(n.parent).tolist()
            assert tokens[0] == fingerprint(context), f"node {i} spliced onto a wrong prefix"
        if i in parents:  # non-final segments are exactly segment_tokens long
            assert len(tokens) == cfg.segment_tokens
            assert cfg.eos_token_id not in tokens
        if cfg.eos_token_id is not None and EOS in tokens:
            assert tokens.index(EOS) == len(tokens) - 1
    for leaf in tree.leaves:
        path = tree.path(leaf.node)
        response = [t for k in path for t in nodes[k].token_ids.tolist()]  # independent concat
        assert tree.response_tokens(leaf.node).tolist() == response
        assert len(tree.response_logprobs(leaf.node)) == len(response)
        assert tree.response_length(leaf.node) == len(response) <= cfg.response_cap
        assert leaf.finish_reason in {"answer", "eos", "stop", "length", "depth", "repetition"}
        if leaf.finish_reason == "answer":
            assert last_boxed(decode(response)) is not None
        if leaf.finish_reason == "eos":
            assert response[-1] == EOS
        if leaf.finish_reason == "depth":
            assert depth[leaf.node] == cfg.max_depth
        if leaf.finish_reason == "length":
            assert len(response) == cfg.response_cap
    s = tree.stats
    assert s.decoded_tokens == sum(len(n.token_ids) for n in nodes)
    assert s.independent_tokens == sum(tree.response_length(x.node) for x in tree.leaves)
    assert s.max_depth_reached == max(depth)
    assert s.decoded_tokens <= s.independent_tokens


def check_calls(gen: ScriptedGenerator, trees: list[TreeRollout]) -> None:
    """One generator call per step; stats.prefill and engine_calls match what was submitted."""
    assert sum(len(c) for c in gen.calls) == sum(len(t.nodes) for t in trees)
    for t in trees:
        calls = [
            c
            for c in gen.calls
            if any(r.token_ids[: len(t.prompt_token_ids)] == t.prompt_token_ids.tolist() for r in c)
        ]
        assert t.stats.engine_calls == len(calls)
        assert t.stats.prefill_tokens == sum(
            len(r.token_ids)
            for c in calls
            for r in c
            if r.token_ids[: len(t.prompt_token_ids)] == t.prompt_token_ids.tolist()
        )


def test_full_binary_tree_shape_and_saving() -> None:
    """No early stops: d0 = b = 2 and w = 16 give a full binary tree of depth 4. Decoding it costs
    (2+4+8+16) segments against 16 x 4 for independent sampling of the same leaves."""
    cfg = TreeConfig(width=16, segment_tokens=5, max_depth=4, branching=2, initial_divergence=2)
    gen = ScriptedGenerator()
    (tree,) = grow(gen, cfg, [[7, 8, 9]])
    check_tree(tree, cfg)
    assert [len(c) for c in gen.calls] == [2, 4, 8, 16]
    assert Counter(tree.depth(i) for i in range(len(tree.nodes))) == {1: 2, 2: 4, 3: 8, 4: 16}
    assert tree.stats.decoded_tokens == 30 * 5
    assert tree.stats.independent_tokens == 16 * 4 * 5
    assert tree.stats.decoded_tokens / tree.stats.independent_tokens == pytest.approx(0.46875)
    assert all(leaf.finish_reason == "depth" for leaf in tree.leaves)
    # prefill: each request's context is prompt + its parent's path
    assert tree.stats.prefill_tokens == sum(
        (3 + 5 * (d - 1)) * k for d, k in [(1, 2), (2, 4), (3, 8), (4, 16)]
    )


def test_budget_caps_requests_at_width() -> None:
    cfg = TreeConfig(width=6, segment_tokens=3, max_depth=5, branching=2, initial_divergence=4)
    gen = ScriptedGenerator()
    (tree,) = grow(gen, cfg, [[1]])
    # 4 -> min(6, 8) = 6 -> 6 ... never more than w requests in flight
    assert [len(c) for c in gen.calls] == [4, 6, 6, 6, 6]
    check_tree(tree, cfg)


def test_all_prompts_share_one_engine_call_per_step_and_siblings_are_adjacent() -> None:
    cfg = TreeConfig(width=8, segment_tokens=4, max_depth=3, branching=2, initial_divergence=2)
    gen = ScriptedGenerator(seed=1, stop_p=0.2)
    prompts = [[2, i] for i in range(3, 8)]
    trees = grow(gen, cfg, prompts)
    for t in trees:
        check_tree(t, cfg)
    check_calls(gen, trees)
    # every step with work carries requests of every prompt that still has open paths
    for call in gen.calls:
        contexts = [tuple(r.token_ids) for r in call]
        # siblings (same context) appear consecutively
        seen: list[tuple[int, ...]] = []
        for c in contexts:
            if seen and seen[-1] == c:
                continue
            assert c not in seen, "siblings are not adjacent in the batch"
            seen.append(c)
    assert (
        len(gen.calls) <= cfg.max_depth * 4
    )  # bounded: fallback rounds add steps, not calls per prompt


def test_eos_only_segment_ends_the_path_and_tokens_after_eos_are_dropped() -> None:
    class EosGen:
        calls = 0

        async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
            self.calls += 1
            out = []
            for i, r in enumerate(requests):
                if i == 0:  # only EOS
                    out.append(GeneratedSegment([EOS], [-0.1], finished=False))
                else:  # EOS mid-segment followed by junk the engine did not stop on
                    out.append(GeneratedSegment([5, EOS, 6, 7][: r.max_tokens], [-0.1] * 4, False))
            return out

    gen = EosGen()
    cfg = TreeConfig(
        width=2,
        segment_tokens=4,
        max_depth=3,
        initial_divergence=2,
        eos_token_id=EOS,
        fallback=False,
    )
    (tree,) = asyncio.run(TreeSampler(gen, cfg, decode=decode).expand([[1, 2]]))
    assert gen.calls == 1
    assert [tree.response_tokens(x.node).tolist() for x in tree.leaves] == [[EOS], [5, EOS]]
    assert [leaf.finish_reason for leaf in tree.leaves] == ["eos", "eos"]


def test_response_cap_that_is_not_a_segment_multiple() -> None:
    cfg = TreeConfig(
        width=4, segment_tokens=4, max_depth=10, max_response_tokens=10, initial_divergence=2
    )
    gen = ScriptedGenerator()
    (tree,) = grow(gen, cfg, [[1]])
    check_tree(tree, cfg)
    assert {tree.response_length(x.node) for x in tree.leaves} == {10}
    assert {leaf.finish_reason for leaf in tree.leaves} == {"length"}
    assert [r.max_tokens for r in gen.calls[-1]] == [2] * 4


def test_repetition_ends_a_path() -> None:
    assert repeats_tail([9, 1, 2, 1, 2, 1, 2], max_ngram=2, repeats=3)
    assert not repeats_tail([9, 1, 2, 1, 2, 1, 3], max_ngram=2, repeats=3)
    assert repeats_tail([4, 4, 4], max_ngram=1, repeats=3)
    base = dict(width=2, segment_tokens=4, max_depth=10, initial_divergence=2, fallback=False)
    gen = ScriptedGenerator(filler=1)  # each segment: fingerprint, then 1 1 1
    (tree,) = grow(gen, TreeConfig(**base, repetition_ngram=1, repetition_repeats=3), [[3]])
    assert {leaf.finish_reason for leaf in tree.leaves} == {"repetition"}
    assert max(tree.depth(i) for i in range(len(tree.nodes))) == 1
    (tree,) = grow(gen, TreeConfig(**base, repetition_ngram=1, repetition_repeats=4), [[3]])
    assert {leaf.finish_reason for leaf in tree.leaves} == {"depth"}


def test_fallback_refills_to_width_cutting_at_segment_boundaries() -> None:
    cfg = TreeConfig(
        width=8, segment_tokens=3, max_depth=6, initial_divergence=2, branching=2, eos_token_id=EOS
    )
    gen = ScriptedGenerator(seed=3, eos_p=0.45)
    trees = grow(gen, cfg, [[1, 1], [2, 2], [3, 3]], seed=5)
    assert any(t.stats.fallbacks for t in trees)
    for t in trees:
        check_tree(t, cfg)  # includes: new paths generated under prompt + truncated path


def test_without_fallback_trees_may_stay_below_width() -> None:
    cfg = TreeConfig(
        width=8,
        segment_tokens=3,
        max_depth=6,
        initial_divergence=1,
        fallback=False,
        eos_token_id=EOS,
    )
    gen = ScriptedGenerator(seed=3, eos_p=0.6)
    trees = grow(gen, cfg, [[1], [2], [3], [4]])
    assert any(len(t.leaves) < 8 for t in trees)
    for t in trees:
        check_tree(t, cfg)
        assert t.stats.fallbacks == 0


def test_fallback_prefers_answered_leaves_and_window_grid() -> None:
    """With a window of 2 segments, every fallback fork hangs under a node at an even depth."""
    cfg = TreeConfig(
        width=6,
        segment_tokens=2,
        max_depth=8,
        initial_divergence=1,
        branching=1,
        fallback_window=4,
        eos_token_id=EOS,
    )
    gen = ScriptedGenerator(seed=11, eos_p=0.3)
    (tree,) = grow(gen, cfg, [[5]], seed=2)
    check_tree(tree, cfg)
    assert tree.stats.fallbacks > 0
    # branching 1 means any node with 2+ children got them from fallback cuts
    forked = [i for i in range(len(tree.nodes)) if len(tree.children(i)) > 1]
    assert forked and all(tree.depth(i) % 2 == 0 for i in forked)


@pytest.mark.parametrize("window", [None, -1, "-1"])
def test_unset_fallback_window_means_one_segment(window: object) -> None:
    cfg = TreeConfig(segment_tokens=7, fallback_window=window)  # type: ignore[arg-type]
    assert cfg.fallback_window is None and cfg.window_segments == 1


def test_bad_tree_config_is_refused_with_the_field() -> None:
    with pytest.raises(ValidationError, match="fallback_window"):
        TreeConfig(segment_tokens=4, fallback_window=6)
    with pytest.raises(ValidationError, match="initial_divergence_range"):
        TreeConfig(initial_divergence_range=(5, 2))
    with pytest.raises(ValidationError, match="width"):
        TreeConfig(width=0)


def test_random_initial_divergence_takes_effect() -> None:
    cfg = TreeConfig(
        width=16, segment_tokens=2, max_depth=1, initial_divergence_range=(2, 8), fallback=False
    )
    gen = ScriptedGenerator()
    trees = grow(gen, cfg, [[i] for i in range(40)], seed=4)
    fanouts = [len(t.children(-1)) for t in trees]
    assert min(fanouts) >= 2 and max(fanouts) <= 8
    assert len(set(fanouts)) >= 4, fanouts


def test_root_fanout_is_clamped_to_width() -> None:
    cfg = TreeConfig(width=3, segment_tokens=2, max_depth=2, initial_divergence=10)
    (tree,) = grow(ScriptedGenerator(), cfg, [[1]])
    assert len(tree.children(-1)) == 3
    check_tree(tree, cfg)


def test_deterministic_given_seed() -> None:
    cfg = TreeConfig(
        width=8, segment_tokens=3, max_depth=5, initial_divergence_range=(2, 4), eos_token_id=EOS
    )

    def run(seed: int) -> list[list[list[int]]]:
        gen = ScriptedGenerator(seed=9, eos_p=0.3, stop_p=0.1)
        trees = grow(gen, cfg, [[1], [2]], seed=seed)
        return [[n.token_ids.tolist() for n in t.nodes] for t in trees]

    assert run(1) == run(1)
    assert run(1) != run(2)


class _ScoredGenerator:
    """Full-length segments; paths under the first root child get high log-probs."""

    async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
        out = []
        for r in requests:
            good = len(r.token_ids) > 1 and r.token_ids[1] == 100
            first = (
                100
                if len(r.token_ids) == 1 and not any(o.token_ids[0] == 100 for o in out)
                else 200
            )
            toks = (
                [first] + [3] * (r.max_tokens - 1) if len(r.token_ids) == 1 else [3] * r.max_tokens
            )
            lp = -0.01 if good or first == 100 else -3.0
            out.append(GeneratedSegment(toks, [lp] * len(toks), False))
        return out


@pytest.mark.parametrize(
    ("allocation", "favoured"),
    [
        ("logprob_high", True),
        ("logprob_low", False),
        ("entropy_low", True),
        ("entropy_high", False),
    ],
)
def test_weighted_allocation_follows_the_score(allocation: str, favoured: bool) -> None:
    cfg = TreeConfig(
        width=16,
        segment_tokens=2,
        max_depth=3,
        initial_divergence=2,
        branching=4,
        allocation=allocation,
        allocation_temperature=0.05,
        repetition_ngram=0,
    )  # type: ignore[arg-type]
    (tree,) = asyncio.run(TreeSampler(_ScoredGenerator(), cfg, rng=0, decode=decode).expand([[1]]))
    good, bad = tree.children(-1)
    assert tree.nodes[good].token_ids[0] == 100
    n_good, n_bad = len(tree.children(good)), len(tree.children(bad))
    assert (n_good > n_bad) == favoured, (n_good, n_bad)
    assert min(n_good, n_bad) >= 1  # every active path continues


def test_uniform_allocation_is_balanced() -> None:
    cfg = TreeConfig(width=10, segment_tokens=2, max_depth=2, initial_divergence=4, branching=4)
    (tree,) = grow(ScriptedGenerator(), cfg, [[1]])
    assert sorted(len(tree.children(c)) for c in tree.children(-1)) == [2, 2, 3, 3]


def test_generator_contract_violations_are_errors() -> None:
    class Short:
        async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
            return []

    class TooLong:
        async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
            return [
                GeneratedSegment([1] * (r.max_tokens + 1), [-1.0] * (r.max_tokens + 1), False)
                for r in requests
            ]

    cfg = TreeConfig(width=2, segment_tokens=2, max_depth=2)
    assert isinstance(ScriptedGenerator(), SegmentGenerator)
    with pytest.raises(ValueError, match="0 outputs for 2 requests"):
        asyncio.run(TreeSampler(Short(), cfg, decode=decode).expand([[1]]))
    with pytest.raises(ValueError, match="exceeds max_tokens"):
        asyncio.run(TreeSampler(TooLong(), cfg, decode=decode).expand([[1]]))


@given(
    width=st.integers(1, 12),
    seg=st.integers(1, 5),
    depth=st.integers(1, 6),
    branching=st.integers(1, 4),
    d0=st.integers(1, 6),
    cap=st.one_of(st.none(), st.integers(1, 30)),
    fallback=st.booleans(),
    allocation=st.sampled_from(["uniform", "logprob_high", "entropy_low"]),
    stop_p=st.floats(0, 0.5),
    eos_p=st.floats(0, 0.5),
    short_p=st.floats(0, 0.3),
    answer_p=st.floats(0, 0.3),
    answer_stop=st.sampled_from(["boxed", "none"]),
    seed=st.integers(0, 10**6),
    n_prompts=st.integers(1, 4),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_invariants_hold_for_random_generators(
    width: int,
    seg: int,
    depth: int,
    branching: int,
    d0: int,
    cap: int | None,
    fallback: bool,
    allocation: str,
    stop_p: float,
    eos_p: float,
    short_p: float,
    answer_p: float,
    answer_stop: str,
    seed: int,
    n_prompts: int,
) -> None:
    cfg = TreeConfig(
        width=width,
        segment_tokens=seg,
        max_depth=depth,
        branching=branching,
        initial_divergence=d0,
        max_response_tokens=cap,
        fallback=fallback,
        allocation=allocation,
        eos_token_id=EOS,
        answer_stop=answer_stop,
    )  # type: ignore[arg-type]
    gen = ScriptedGenerator(
        seed=seed, stop_p=stop_p, eos_p=eos_p, short_p=short_p, answer_p=answer_p
    )
    prompts = [[1000 + i, i] for i in range(n_prompts)]
    trees = grow(gen, cfg, prompts, seed=seed)
    assert [t.prompt_token_ids.tolist() for t in trees] == prompts
    for t in trees:
        check_tree(t, cfg)
    check_calls(gen, trees)
    # every request fits the width: never more requests in flight than leaves still owed
    for call in gen.calls:
        per_prompt = Counter(tuple(r.token_ids[:2]) for r in call)
        assert max(per_prompt.values()) <= width


# ---------------------------------------------------------------------------------------------
# The paper's budget rules, pinned with scripted engines
# ---------------------------------------------------------------------------------------------


class EndsFirstPathOnce:
    """Full segments, except that request 0 of the first call ends at once with EOS."""

    def __init__(self) -> None:
        self.calls: list[list[SegmentRequest]] = []

    async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
        first = not self.calls
        self.calls.append(list(requests))
        out = []
        for i, r in enumerate(requests):
            toks = [EOS] if first and i == 0 else [fingerprint(r.token_ids)] * r.max_tokens
            out.append(GeneratedSegment(toks, [-0.5] * len(toks), finished=False))
        return out


def test_ended_paths_hand_their_branches_to_the_survivors() -> None:
    """w = 16, b = 2: one of the two root paths ends at step 0. Its 2 branches go to the
    survivor: 2, 4, 8, 15, 15, 15 requests per step (``min(w - leaves, b * active)`` alone, the
    rule this replaced, gives 2, 2, 4, 8, 15, 15)."""
    cfg = TreeConfig(
        width=16, segment_tokens=2, max_depth=6, branching=2, initial_divergence=2,
        eos_token_id=EOS, answer_stop="none",
    )  # fmt: skip
    gen = EndsFirstPathOnce()
    (tree,) = asyncio.run(TreeSampler(gen, cfg, rng=0).expand([[3, 4]]))
    assert [len(c) for c in gen.calls] == [2, 4, 8, 15, 15, 15]
    assert len(tree.leaves) == 16 and tree.stats.fallbacks == 0
    check_tree(tree, cfg)


def test_fallback_forks_only_from_answered_leaves_and_may_cut_at_the_prompt() -> None:
    """w = 8, b = 2, depth cap 2. Step 1 ends leaf A1 with EOS and A2, B1, B2 at the depth cap:
    the 4 fallback requests hang under the prompt or under A (A1's boundaries), never under B
    (whose leaves only hit the cap); over seeds both cut points occur."""

    class Script:
        def __init__(self) -> None:
            self.calls: list[list[SegmentRequest]] = []

        async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
            step = len(self.calls)
            self.calls.append(list(requests))
            out = []
            for i, r in enumerate(requests):
                toks = [fingerprint(r.token_ids)] + [100 + 10 * step + i] * (r.max_tokens - 1)
                if step == 1 and i == 0:
                    toks[-1] = EOS
                out.append(GeneratedSegment(toks, [-0.5] * len(toks), finished=False))
            return out

    cfg = TreeConfig(
        width=8, segment_tokens=2, max_depth=2, branching=2, initial_divergence=2,
        eos_token_id=EOS, answer_stop="none",
    )  # fmt: skip
    cuts_seen: set[str] = set()
    for seed in range(12):
        gen = Script()
        (tree,) = asyncio.run(TreeSampler(gen, cfg, rng=seed).expand([[9]]))
        check_tree(tree, cfg)
        a, b = [n for n in tree.nodes if n.parent == -1][:2]
        assert [leaf.finish_reason for leaf in tree.leaves[:4]] == [
            "eos",
            "depth",
            "depth",
            "depth",
        ]
        names = {
            (9,): "prompt",
            tuple([9, *a.token_ids.tolist()]): "A",
            tuple([9, *b.token_ids.tolist()]): "B",
        }
        fallback_call = gen.calls[2]
        assert len(fallback_call) == 4
        got = {names.get(tuple(r.token_ids), "other") for r in fallback_call}
        assert got <= {"prompt", "A"}, got
        cuts_seen |= got
        assert tree.stats.fallbacks == 2  # two cuts of b = 2 paths each cover the 4 missing
    assert cuts_seen == {"prompt", "A"}


def test_with_no_answered_leaf_fallback_restarts_from_the_prompt() -> None:
    """Every path hits the depth cap before w leaves exist: nothing to fork from but the prompt."""
    cfg = TreeConfig(
        width=6, segment_tokens=2, max_depth=1, branching=2, initial_divergence=2,
        eos_token_id=EOS, answer_stop="none",
    )  # fmt: skip
    gen = ScriptedGenerator(seed=1)
    (tree,) = grow(gen, cfg, [[5]])
    assert [len(c) for c in gen.calls] == [2, 4]
    assert all(r.token_ids == [5] for r in gen.calls[1])
    assert tree.stats.fallbacks == 1 and len(tree.leaves) == 6


def test_budget_transfer_needs_fewer_fallbacks_and_engine_calls() -> None:
    """Half the segments end their path (EOS). Against the rule without transfer
    (``min(w - leaves, b * active)``, run here as the reference), handing ended paths' branches
    to the survivors keeps trees growing: fewer prompts run out of paths (fallback rounds at most
    half) and trees finish in fewer engine calls."""

    class WithoutTransfer(TreeSampler):
        def _plan(self, st):  # type: ignore[no-untyped-def]
            if not st.active:
                return super()._plan(st)
            n = min(self.config.width - len(st.tree.leaves), self.config.branching * len(st.active))
            return self._allocate(st, n)

    cfg = TreeConfig(
        width=16, segment_tokens=4, max_depth=6, branching=2, initial_divergence=2,
        eos_token_id=EOS, answer_stop="none",
    )  # fmt: skip
    prompts = [[i, i] for i in range(64)]
    got = {}
    for name, cls in (("transfer", TreeSampler), ("without", WithoutTransfer)):
        rounds = []
        sampler = cls(ScriptedGenerator(seed=7, eos_p=0.5), cfg, rng=7, decode=decode)
        fallback = sampler._fallback

        def counted(st, room, fallback=fallback, rounds=rounds):  # type: ignore[no-untyped-def]
            rounds.append(room)
            return fallback(st, room)

        sampler._fallback = counted  # type: ignore[method-assign]
        trees = asyncio.run(sampler.expand(prompts))
        for t in trees:
            check_tree(t, cfg)
        got[name] = (len(rounds) / len(trees), len(sampler.generator.calls))  # type: ignore[attr-defined]
    (rounds_t, calls_t), (rounds_w, calls_w) = got["transfer"], got["without"]
    assert rounds_t <= 0.5 * rounds_w and calls_t < calls_w, got


def test_a_closed_boxed_answer_ends_the_path() -> None:
    """``answer_stop = boxed``: the segment that closes ``\\boxed{...}`` ends the path (also when
    the box opened in an earlier segment); with ``none`` the path goes on."""

    class Boxes:
        async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
            out = []
            for r in requests:
                depth = (len(r.token_ids) - 1) // 3
                toks = [fingerprint(r.token_ids), 1, 1]
                if depth == 0:
                    toks[2] = BOX_OPEN  # opened at the end of segment 1 ...
                if depth == 1:
                    toks[1] = BOX_CLOSE  # ... closed in segment 2
                out.append(GeneratedSegment(toks, [-0.5] * 3, finished=False))
            return out

    base = dict(width=2, segment_tokens=3, max_depth=4, initial_divergence=2, eos_token_id=EOS)
    (tree,) = asyncio.run(
        TreeSampler(Boxes(), TreeConfig(**base), decode=decode).expand([[7]])  # type: ignore[arg-type]
    )
    assert [leaf.finish_reason for leaf in tree.leaves] == ["answer", "answer"]
    assert {tree.response_length(x.node) for x in tree.leaves} == {6}
    cfg = TreeConfig(**base, answer_stop="none")  # type: ignore[arg-type]
    (tree,) = asyncio.run(TreeSampler(Boxes(), cfg, decode=decode).expand([[7]]))
    assert {leaf.finish_reason for leaf in tree.leaves} == {"depth"}
    with pytest.raises(ValueError, match="needs a decode function"):
        TreeSampler(Boxes(), TreeConfig(**base))  # type: ignore[arg-type]
