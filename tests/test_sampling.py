"""TreePO tree sampling against scripted generators: budget, branching, ends, fallback, stats."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.config import TreeConfig
from pipeline.treepo.rewards import last_boxed
from pipeline.treepo.sampling import (
    GeneratedSegment,
    PathGenerator,
    PathStream,
    TreeSampler,
    repeats_tail,
)
from pipeline.wire.messages import TreeRollout
from tests.scripted import (
    BOX_CLOSE,
    BOX_OPEN,
    EOS,
    ScriptedEngine,
    ScriptedGenerator,
    ScriptedPath,
    decode,
    fingerprint,
)


def grow(
    gen: ScriptedEngine, cfg: TreeConfig, prompts: list[list[int]], seed: int = 0
) -> list[TreeRollout]:
    return asyncio.run(TreeSampler(gen, cfg, rng=seed, decode=decode).expand(prompts))


def expected_independent(tree: TreeRollout) -> int:
    """Leaves x probability-weighted mean leaf length, computed top-down by recursion (an
    independent check of ``TreeRollout.recount``)."""
    total = 0.0

    def walk(node: int, mass: float, length: int) -> None:
        nonlocal total
        kids = tree.children(node)
        if not kids:
            total += mass * length
        for k in kids:
            walk(k, mass / len(kids), length + len(tree.nodes[k].token_ids))

    walk(-1, 1.0, 0)
    return round(len(tree.leaves) * total)


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
    assert abs(s.independent_tokens - expected_independent(tree)) <= 1  # rounding
    assert s.max_depth_reached == max(depth)
    # every request (root path, sibling, fallback fork) runs until its path ends in one leaf
    assert s.engine_calls == len(tree.leaves)


def check_requests(gen: ScriptedEngine, trees: list[TreeRollout]) -> None:
    """stats.engine_calls and prefill_tokens match what was opened; every request was
    cancelled or ended, and none was read after that."""
    assert gen.running == 0
    for t in trees:
        prompt = t.prompt_token_ids.tolist()
        mine = [r for r in gen.opened if r.token_ids[: len(prompt)] == prompt]
        assert t.stats.engine_calls == len(mine)
        assert t.stats.prefill_tokens == sum(len(r.token_ids) for r in mine)


def test_full_binary_tree_shape_and_saving() -> None:
    """No early stops: d0 = b = 2 and w = 16 give a full binary tree of depth 4. Decoding it costs
    (2+4+8+16) segments against 16 x 4 for independent sampling, with one request per leaf: at
    each boundary the path's own request goes on and one new sibling starts."""
    cfg = TreeConfig(width=16, segment_tokens=5, max_depth=4, branching=2, initial_divergence=2)
    gen = ScriptedGenerator()
    (tree,) = grow(gen, cfg, [[7, 8, 9]])
    check_tree(tree, cfg)
    check_requests(gen, [tree])
    assert Counter(tree.depth(i) for i in range(len(tree.nodes))) == {1: 2, 2: 4, 3: 8, 4: 16}
    assert tree.stats.decoded_tokens == 30 * 5
    assert tree.stats.independent_tokens == 16 * 4 * 5
    assert tree.stats.decoded_tokens / tree.stats.independent_tokens == pytest.approx(0.46875)
    assert all(leaf.finish_reason == "depth" for leaf in tree.leaves)
    # requests: 2 from the prompt, then 2, 4, 8 siblings forked at depths 1, 2, 3; a request
    # may decode what is left of the depth budget from where it starts
    assert Counter(len(r.token_ids) for r in gen.opened) == {3: 2, 8: 2, 13: 4, 18: 8}
    assert all(r.max_tokens == 20 - (len(r.token_ids) - 3) for r in gen.opened)
    assert tree.stats.prefill_tokens == 3 * 2 + 8 * 2 + 13 * 4 + 18 * 8
    assert gen.most_running == 16


def test_budget_caps_open_paths_at_width() -> None:
    cfg = TreeConfig(width=6, segment_tokens=3, max_depth=5, branching=2, initial_divergence=4)
    gen = ScriptedGenerator()
    (tree,) = grow(gen, cfg, [[1]])
    # 4 -> min(6, 8) = 6 paths, then never more than w requests at once
    assert gen.most_running == 6 and len(gen.opened) == 6
    check_tree(tree, cfg)


class Tortoise(ScriptedGenerator):
    """Request 0 is 50 times slower than every other request."""

    def ticks(self, path: ScriptedPath) -> int:
        return 50 if path.index == 0 else 1


def test_no_path_waits_for_another_and_trees_grow_together() -> None:
    """No level barrier: while one root path is still in its first segment, its sibling's
    subtree already reaches the depth cap. No tree barrier: the engine runs paths of every tree
    at once (more requests than one tree's width)."""
    cfg = TreeConfig(width=8, segment_tokens=4, max_depth=3, branching=2, initial_divergence=2)
    gen = Tortoise()
    trees = grow(gen, cfg, [[2, 3]])
    check_tree(trees[0], cfg)
    slow = gen.paths[0]
    first_read_done = [i for i, p in enumerate(gen.paths) if p is not slow]
    # every request except the slow one's children started before the slow path's first boundary
    # (the tortoise needs 200 turns for 4 tokens; its sibling's subtree is done in ~12)
    slow_children = [
        i for i, r in enumerate(gen.opened) if r.token_ids[:6] == slow.context[:6] and i != 0
    ]
    assert len(first_read_done) - len(slow_children) >= 3
    gen = ScriptedGenerator(seed=1, stop_p=0.2)
    prompts = [[2, i] for i in range(3, 8)]
    trees = grow(gen, cfg, prompts)
    for t in trees:
        check_tree(t, cfg)
    check_requests(gen, trees)
    assert gen.most_running > cfg.width


def test_slow_path_does_not_delay_its_siblings_subtree() -> None:
    """The fast root path's whole subtree finishes while the slow one is on its first segment."""
    cfg = TreeConfig(
        width=4, segment_tokens=2, max_depth=3, branching=2, initial_divergence=2, fallback=False
    )
    gen = Tortoise()
    finished_at: dict[int, int] = {}
    ticks = 0

    async def clock() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            for p in gen.paths:
                if p.ended and p.index not in finished_at:
                    finished_at[p.index] = ticks
            await asyncio.sleep(0)

    async def main() -> TreeRollout:
        task = asyncio.create_task(clock())
        tree = await TreeSampler(gen, cfg, rng=0, decode=decode).grow([1])
        task.cancel()
        return tree

    tree = asyncio.run(main())
    check_tree(tree, cfg)
    fast = [i for i in finished_at if gen.paths[i].request.token_ids[:2] != [1]] + [1]
    assert max(finished_at[i] for i in fast if i != 0) < 100 < finished_at[0]


def test_eos_only_segment_ends_the_path_and_tokens_after_eos_are_dropped() -> None:
    class EosGen(ScriptedEngine):
        def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
            if path.index == 0:  # only EOS
                return GeneratedSegment([EOS], [-0.1], finished=False)
            # EOS mid-segment followed by junk the engine did not stop on
            return GeneratedSegment([5, EOS, 6, 7][:n], [-0.1] * min(4, n), False)

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
    assert len(gen.opened) == 2 and all(len(p.reads) == 1 for p in gen.paths)
    assert [tree.response_tokens(x.node).tolist() for x in tree.leaves] == [[EOS], [5, EOS]]
    assert [leaf.finish_reason for leaf in tree.leaves] == ["eos", "eos"]


def test_response_cap_that_is_not_a_segment_multiple() -> None:
    cfg = TreeConfig(
        width=4, segment_tokens=4, max_depth=10, max_response_tokens=10, initial_divergence=2
    )
    gen = ScriptedGenerator()
    (tree,) = grow(gen, cfg, [[1]])
    check_tree(tree, cfg)
    check_requests(gen, [tree])
    assert {tree.response_length(x.node) for x in tree.leaves} == {10}
    assert {leaf.finish_reason for leaf in tree.leaves} == {"length"}
    assert all(p.reads[-1] == 2 for p in gen.paths)  # the last segment asks for the 2 left
    assert [r.max_tokens for r in gen.opened] == [10, 10, 6, 6]


def test_repetition_ends_a_path() -> None:
    assert repeats_tail([9, 1, 2, 1, 2, 1, 2], max_ngram=2, repeats=3)
    assert not repeats_tail([9, 1, 2, 1, 2, 1, 3], max_ngram=2, repeats=3)
    assert repeats_tail([4, 4, 4], max_ngram=1, repeats=3)
    base = dict(width=2, segment_tokens=4, max_depth=10, initial_divergence=2, fallback=False)
    gen = ScriptedGenerator(filler=1)  # each segment: fingerprint, then 1 1 1
    (tree,) = grow(gen, TreeConfig(**base, repetition_ngram=1, repetition_repeats=3), [[3]])
    assert {leaf.finish_reason for leaf in tree.leaves} == {"repetition"}
    assert max(tree.depth(i) for i in range(len(tree.nodes))) == 1
    assert all(p.cancelled for p in gen.paths)  # the engine stops decoding an ended path
    (tree,) = grow(gen, TreeConfig(**base, repetition_ngram=1, repetition_repeats=4), [[3]])
    assert {leaf.finish_reason for leaf in tree.leaves} == {"depth"}


def test_fallback_refills_to_width_cutting_at_segment_boundaries() -> None:
    cfg = TreeConfig(
        width=8, segment_tokens=3, max_depth=6, initial_divergence=2, branching=2, eos_token_id=EOS
    )
    gen = ScriptedGenerator(seed=3, eos_p=0.45)
    trees = grow(gen, cfg, [[i, i] for i in range(1, 9)], seed=5)
    assert any(t.stats.fallbacks for t in trees)
    for t in trees:
        check_tree(t, cfg)  # includes: new paths generated under prompt + truncated path
    check_requests(gen, trees)


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
        gen = ScriptedGenerator(seed=9, eos_p=0.3, stop_p=0.1, jitter=2)
        trees = grow(gen, cfg, [[1], [2]], seed=seed)
        return [[n.token_ids.tolist() for n in t.nodes] for t in trees]

    assert run(1) == run(1)
    assert run(1) != run(2)


class _Scored(ScriptedEngine):
    """Full-length segments; the first root path and everything under it get high log-probs."""

    def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
        good = path.index == 0 or (len(path.context) > 1 and path.context[1] == 100)
        first = 100 if path.index == 0 else 200
        toks = [first] + [3] * (n - 1) if len(path.context) == 1 else [3] * n
        lp = -0.01 if good else -3.0
        return GeneratedSegment(toks, [lp] * len(toks), False)


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
    (tree,) = asyncio.run(TreeSampler(_Scored(), cfg, rng=0, decode=decode).expand([[1]]))
    good, bad = tree.children(-1)
    assert tree.nodes[good].token_ids[0] == 100
    n_good, n_bad = len(tree.children(good)), len(tree.children(bad))
    assert (n_good > n_bad) == favoured, (n_good, n_bad)
    assert min(n_good, n_bad) >= 1  # every active path continues


def test_uniform_allocation_is_balanced() -> None:
    """4 root paths reach their boundary in the same step and share the 6 free slots evenly
    (first come, first served would give 3, 3, 0, 0 new paths)."""
    cfg = TreeConfig(width=10, segment_tokens=2, max_depth=2, initial_divergence=4, branching=4)
    (tree,) = grow(ScriptedGenerator(), cfg, [[1]])
    assert sorted(len(tree.children(c)) for c in tree.children(-1)) == [2, 2, 3, 3]


def test_generator_contract_violations_are_errors() -> None:
    class TooLong(ScriptedEngine):
        def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
            return GeneratedSegment([1] * (n + 1), [-1.0] * (n + 1), False)

    class Mismatch(ScriptedEngine):
        def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
            return GeneratedSegment([1] * n, [-1.0], False)

    cfg = TreeConfig(width=2, segment_tokens=2, max_depth=2)
    gen = ScriptedGenerator()
    assert isinstance(gen, PathGenerator) and isinstance(gen.open(PathRequest_([1])), PathStream)
    for engine, message in ((TooLong(), "exceeds max_tokens"), (Mismatch(), "1 logprobs")):
        with pytest.raises(ValueError, match=message):
            asyncio.run(TreeSampler(engine, cfg, decode=decode).expand([[1]]))
        assert all(p.cancelled or p.ended for p in engine.paths)  # nothing left running


def PathRequest_(tokens: list[int]):  # type: ignore[no-untyped-def]
    from pipeline.treepo.sampling import PathRequest

    return PathRequest(tokens, 4)


def test_an_abandoned_tree_cancels_every_request() -> None:
    cfg = TreeConfig(width=8, segment_tokens=4, max_depth=4, initial_divergence=2)
    gen = Tortoise()

    async def main() -> None:
        task = asyncio.create_task(TreeSampler(gen, cfg, rng=0, decode=decode).grow([1]))
        for _ in range(6):
            await asyncio.sleep(0)
        assert gen.running >= 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert gen.running == 0 and all(p.cancelled or p.ended for p in gen.paths)


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
    jitter=st.integers(0, 3),
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
    jitter: int,
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
        seed=seed, stop_p=stop_p, eos_p=eos_p, short_p=short_p, answer_p=answer_p, jitter=jitter
    )
    prompts = [[1000 + i, i] for i in range(n_prompts)]
    trees = grow(gen, cfg, prompts, seed=seed)
    assert [t.prompt_token_ids.tolist() for t in trees] == prompts
    for t in trees:
        check_tree(t, cfg)
    check_requests(gen, trees)


# ---------------------------------------------------------------------------------------------
# The paper's budget rules, pinned with scripted engines
# ---------------------------------------------------------------------------------------------


class EndsFirstPathAtOnce(ScriptedEngine):
    """Full segments, except that request 0 ends at once with EOS."""

    def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
        toks = [EOS] if path.index == 0 else [fingerprint(path.context)] * n
        return GeneratedSegment(toks, [-0.5] * len(toks), finished=path.index == 0)


def test_ended_paths_hand_their_branches_to_the_survivors() -> None:
    """w = 16, b = 2: one of the two root paths ends in its first segment. Its 2 branches go to
    the survivor, which forks 3 new paths at its first boundary (4 paths at depth 2, then 8):
    ``min(w - leaves, b * active)`` alone, the rule this replaced, gives depth-2 width 2."""
    cfg = TreeConfig(
        width=16, segment_tokens=2, max_depth=6, branching=2, initial_divergence=2,
        eos_token_id=EOS, answer_stop="none",
    )  # fmt: skip
    gen = EndsFirstPathAtOnce()
    (tree,) = asyncio.run(TreeSampler(gen, cfg, rng=0).expand([[3, 4]]))
    per_depth = Counter(tree.depth(i) for i in range(len(tree.nodes)))
    assert [per_depth[d] for d in range(1, 4)] == [2, 4, 8] and per_depth[6] == 15
    assert len(tree.leaves) == 16 and tree.stats.fallbacks == 0
    check_tree(tree, cfg)
    check_requests(gen, [tree])


def test_fallback_forks_only_from_answered_leaves_and_may_cut_at_the_prompt() -> None:
    """w = 8, b = 2, depth cap 2. Request 1 (under root path A) ends with EOS in its segment and
    the other three depth-2 paths hit the depth cap: the 4 fallback requests hang under the
    prompt or under A (the answered leaf's boundaries), never under B (whose leaves only hit the
    cap); over seeds both cut points occur."""

    class Script(ScriptedEngine):
        def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
            toks = [fingerprint(path.context)] + [100 + path.index] * (n - 1)
            if path.index == 0 and len(path.reads) == 2:  # A's continuation: EOS
                toks[-1] = EOS
            return GeneratedSegment(toks, [-0.5] * len(toks), finished=toks[-1] == EOS)

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
        reasons = sorted(leaf.finish_reason for leaf in tree.leaves[:4])
        assert reasons == ["depth", "depth", "depth", "eos"]
        names = {
            (9,): "prompt",
            tuple([9, *a.token_ids.tolist()]): "A",
            tuple([9, *b.token_ids.tolist()]): "B",
        }
        fallback = gen.opened[4:]
        assert len(fallback) == 4
        got = {names.get(tuple(r.token_ids), "other") for r in fallback}
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
    assert len(gen.opened) == 6
    assert all(r.token_ids == [5] for r in gen.opened[2:])
    assert tree.stats.fallbacks == 1 and len(tree.leaves) == 6


def test_budget_transfer_needs_fewer_fallbacks() -> None:
    """Half the segments end their path (EOS). Against the rule without transfer (ended paths'
    branches are lost, run here as the reference), handing them to the survivors keeps trees
    growing: fewer trees run out of paths (fallback rounds at most two thirds)."""

    class WithoutTransfer(TreeSampler):
        def _fork(self, g, arrived):  # type: ignore[no-untyped-def]
            g.credit = 0
            super()._fork(g, arrived)

    cfg = TreeConfig(
        width=16, segment_tokens=4, max_depth=6, branching=2, initial_divergence=2,
        eos_token_id=EOS, answer_stop="none",
    )  # fmt: skip
    prompts = [[i, i] for i in range(64)]
    got = {}
    for name, cls in (("transfer", TreeSampler), ("without", WithoutTransfer)):
        rounds = []
        sampler = cls(ScriptedGenerator(seed=7, eos_p=0.5), cfg, rng=7, decode=decode)
        refill = sampler._refill

        def counted(g, refill=refill, rounds=rounds):  # type: ignore[no-untyped-def]
            if len(g.tree.leaves) < cfg.width:
                rounds.append(1)
            return refill(g)

        sampler._refill = counted  # type: ignore[method-assign]
        trees = asyncio.run(sampler.expand(prompts))
        for t in trees:
            check_tree(t, cfg)
        got[name] = len(rounds) / len(trees)
    assert got["transfer"] <= 0.67 * got["without"], got


def test_a_closed_boxed_answer_ends_the_path() -> None:
    """``answer_stop = boxed``: the segment that closes ``\\boxed{...}`` ends the path (also when
    the box opened in an earlier segment); with ``none`` the path goes on."""

    class Boxes(ScriptedEngine):
        def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
            depth = (len(path.context) - 1) // 3
            toks = [fingerprint(path.context), 1, 1]
            if depth == 0:
                toks[2] = BOX_OPEN  # opened at the end of segment 1 ...
            if depth == 1:
                toks[1] = BOX_CLOSE  # ... closed in segment 2
            return GeneratedSegment(toks, [-0.5] * 3, finished=False)

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


def test_independent_estimate_is_unbiased_where_leaf_sums_are_not() -> None:
    """A path ends at each boundary with probability 1/2 (geometric lengths). Over many trees the
    probability-weighted estimate matches the true mean length of an independent sample (2
    segments), while the plain mean over leaves is biased long (long paths branch more)."""
    cfg = TreeConfig(
        width=8, segment_tokens=3, max_depth=12, branching=2, initial_divergence=1,
        eos_token_id=EOS, answer_stop="none", fallback=False, repetition_ngram=0,
    )  # fmt: skip
    gen = ScriptedGenerator(seed=5, stop_p=0.0, eos_p=0.0)

    class Coin(ScriptedEngine):
        rng = __import__("random").Random(3)

        def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
            toks = [fingerprint(path.context)] * n
            if self.rng.random() < 0.5:
                toks[-1] = EOS
            return GeneratedSegment(toks, [-0.5] * n, finished=toks[-1] == EOS)

    del gen
    trees = asyncio.run(TreeSampler(Coin(), cfg, rng=1).expand([[i] for i in range(600)]))
    weighted = sum(t.mean_leaf_length() for t in trees) / len(trees)
    plain = sum(t.response_length(x.node) for t in trees for x in t.leaves) / sum(
        len(t.leaves) for t in trees
    )
    true_mean = 3 * 2.0  # geometric(1/2) segments of 3 tokens (the depth cap barely matters)
    assert abs(weighted - true_mean) < 0.25, weighted
    assert plain > true_mean + 1.0, plain


def test_paths_failing_together_leave_no_unretrieved_task_error() -> None:
    """When the engine stops, every open path's read fails at once: the tree raises that error
    and retrieves all of them (asyncio would log each one left as 'Task exception was never
    retrieved', with a traceback, at a normal shutdown)."""
    import gc

    class Stopping(Exception):
        pass

    class StopsAtOnce(ScriptedEngine):
        def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
            if path.context[0] == 2 and len(path.reads) > 1:
                raise Stopping("the engine is stopping")
            return GeneratedSegment([1] * n, [-1.0] * n, False)

    cfg = TreeConfig(width=8, segment_tokens=2, max_depth=6, initial_divergence=4, branching=2)
    unretrieved: list[dict[str, object]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unretrieved.append(ctx))
        engine = StopsAtOnce()
        with pytest.raises(Stopping):
            await TreeSampler(engine, cfg, rng=0, decode=decode).grow([2])
        assert sum(isinstance(p, ScriptedPath) and len(p.reads) > 1 for p in engine.paths) > 1
        assert engine.running == 0
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert unretrieved == []
