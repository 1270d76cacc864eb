"""Tree advantages against brute force, whitening, dynamic sampling, the per-segment variant."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.treepo.advantage import (
    filter_informative,
    has_signal,
    tree_advantages,
    whiten,
)


def brute_force(paths: list[list[int]], rewards: list[float], mode: str) -> list[float]:
    """TREEPO.md section 2 read literally: groups are 'leaves sharing the first d nodes of my
    path' for d = 1..len-1 (size 1 skipped), plus the root group."""
    out = []
    for i, path in enumerate(paths):
        groups = [list(range(len(paths)))]
        for d in range(1, len(path)):
            g = [j for j, p in enumerate(paths) if p[:d] == path[:d]]
            if len(g) > 1:
                groups.append(g)
        terms = [(len(g), rewards[i] - statistics.fmean(rewards[j] for j in g)) for g in groups]
        if mode == "average":
            out.append(statistics.fmean(t for _, t in terms))
        elif mode == "size_weighted":
            out.append(sum(n * t for n, t in terms) / sum(n for n, _ in terms))
        else:
            out.append(terms[0][1])
    return out


@st.composite
def trees(draw: st.DrawFn) -> tuple[list[list[int]], list[float]]:
    """Random trees as leaf paths: grow nodes with parents, leaves = childless nodes."""
    n = draw(st.integers(1, 25))
    parents = [None] + [
        draw(st.integers(0, k - 1)) if draw(st.booleans()) else None for k in range(1, n)
    ]
    has_child = {p for p in parents if p is not None}
    paths = []
    for k in range(n):
        if k in has_child:
            continue
        path, node = [], k
        while node is not None:
            path.append(node)
            node = parents[node]
        paths.append(path[::-1])
    rewards = [draw(st.sampled_from([-1.0, 1.0, 0.0, 0.5])) for _ in paths]
    return paths, rewards


@given(trees(), st.sampled_from(["average", "size_weighted", "root"]))
@settings(max_examples=300)
def test_modes_match_brute_force(tree: tuple[list[list[int]], list[float]], mode: str) -> None:
    paths, rewards = tree
    assert tree_advantages(paths, rewards, mode) == pytest.approx(brute_force(paths, rewards, mode))  # type: ignore[arg-type]


@given(trees())
def test_root_mode_is_reward_minus_prompt_mean(tree: tuple[list[list[int]], list[float]]) -> None:
    paths, rewards = tree
    mean = sum(rewards) / len(rewards)
    assert tree_advantages(paths, rewards, "root") == pytest.approx([r - mean for r in rewards])


@given(trees(), st.floats(-5, 5), st.sampled_from(["average", "size_weighted", "root"]))
def test_equal_rewards_give_zero(
    tree: tuple[list[list[int]], list[float]], r: float, mode: str
) -> None:
    paths, _ = tree
    assert tree_advantages(paths, [r] * len(paths), mode) == pytest.approx(
        [0.0] * len(paths), abs=1e-9
    )  # type: ignore[arg-type]


def test_worked_example() -> None:
    """docs/algorithm.md's example: two subtrees, a = {a1: +1, a2: +1}, b = {b1: +1, b2: -1}."""
    paths = [["a", "a1"], ["a", "a2"], ["b", "b1"], ["b", "b2"]]
    rewards = [1.0, 1.0, 1.0, -1.0]
    # root mean 0.5; group a mean 1; group b mean 0
    assert tree_advantages(paths, rewards, "root") == [0.5, 0.5, 0.5, -1.5]
    assert tree_advantages(paths, rewards, "average") == [0.25, 0.25, 0.75, -1.25]
    assert tree_advantages(paths, rewards, "size_weighted") == pytest.approx(
        [
            (4 * 0.5 + 2 * 0) / 6,
            (4 * 0.5 + 2 * 0) / 6,
            (4 * 0.5 + 2 * 1) / 6,
            (4 * -1.5 + 2 * -1) / 6,
        ]
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2 paths but 1 rewards"):
        tree_advantages([[1], [2]], [1.0])
    with pytest.raises(ValueError, match="unknown advantage mode"):
        tree_advantages([[1]], [1.0], "median")  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.floats(-10, 10), st.integers(0, 20)), min_size=1, max_size=30))
def test_whiten_matches_token_level_statistics(pairs: list[tuple[float, int]]) -> None:
    adv, counts = [a for a, _ in pairs], [c for _, c in pairs]
    out = whiten(adv, counts)
    tokens = [a for a, c in pairs for _ in range(c)]
    if not tokens:
        assert out == [0.0] * len(adv)
        return
    mean = statistics.fmean(tokens)
    var = statistics.variance(tokens) if len(tokens) > 1 else 0.0  # Bessel-corrected
    expected = [(a - mean) / (var + 1e-8) ** 0.5 for a in adv]
    assert out == pytest.approx(expected, rel=1e-6, abs=1e-6)
    whitened_tokens = [o for o, c in zip(out, counts) for _ in range(c)]
    assert statistics.fmean(whitened_tokens) == pytest.approx(0.0, abs=1e-6)


def test_dynamic_sampling_filter() -> None:
    assert not has_signal([1.0, 1.0, 1.0])
    assert not has_signal([1.0])
    assert has_signal([1.0, -1.0])
    kept, dropped = filter_informative(["t1", "t2", "t3"], [[1, 1], [1, -1], [-1, -1]])
    assert kept == ["t2"] and dropped == 2
