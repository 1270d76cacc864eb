"""Tree advantages (TREEPO.md section 2), batch whitening and the dynamic-sampling filter.

For leaf i with reward R_i the groups are: the root group (all leaves of the prompt) and, for
every ancestor node of the leaf at depth 1..(depth(i) - 1), the leaves below that node; groups of
size 1 are skipped except the root. The term of group G is ``R_i - mean(R_G)``.

* ``average`` (TreePO):   A_i = mean over groups of the terms
* ``size_weighted``:      A_i = sum(|G| * term) / sum(|G|)
* ``root`` (GRPO, mean baseline): A_i = R_i - mean(R over all leaves)

The same A_i applies to every response token of leaf i; ``whiten`` then normalises over all
valid tokens of the training batch. Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Literal, TypeVar

AdvantageMode = Literal["average", "size_weighted", "root"]
MODES: tuple[AdvantageMode, ...] = ("average", "size_weighted", "root")
T = TypeVar("T")


def _groups(paths: Sequence[Sequence[Hashable]]) -> dict[Hashable, list[int]]:
    """Leaves below each non-leaf ancestor node (depth 1 .. depth - 1 of each leaf)."""
    below: dict[Hashable, list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        for node in path[:-1]:
            below[node].append(i)
    return below


def tree_advantages(
    paths: Sequence[Sequence[Hashable]],
    rewards: Sequence[float],
    mode: AdvantageMode = "average",
) -> list[float]:
    """Advantage of each leaf of one prompt's tree (no whitening).

    ``paths[i]`` is leaf i's node-id path from depth 1 down to the leaf (the root is implicit and
    shared); ``rewards[i]`` its scalar reward.
    """
    if len(paths) != len(rewards):
        raise ValueError(f"{len(paths)} paths but {len(rewards)} rewards")
    if mode not in MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; choose one of {MODES}")
    n = len(rewards)
    if n == 0:
        return []
    root_mean = sum(rewards) / n
    if mode == "root":
        return [r - root_mean for r in rewards]
    groups = {node: members for node, members in _groups(paths).items() if len(members) > 1}
    means = {node: sum(rewards[j] for j in m) / len(m) for node, m in groups.items()}
    out = []
    for i, path in enumerate(paths):
        # (group size, term) for the root group and every ancestor group of size > 1
        terms = [(n, rewards[i] - root_mean)]
        terms += [(len(groups[a]), rewards[i] - means[a]) for a in path[:-1] if a in groups]
        if mode == "average":
            out.append(sum(t for _, t in terms) / len(terms))
        else:
            out.append(sum(size * t for size, t in terms) / sum(size for size, _ in terms))
    return out


def whiten(
    advantages: Sequence[float], token_counts: Sequence[int], eps: float = 1e-8
) -> list[float]:
    """Whiten per-sequence advantages over tokens: each advantage stands for ``token_counts[i]``
    identical token values; returns ``(A - mean) / sqrt(var + eps)`` with mean and variance over
    all those tokens. The variance is Bessel-corrected (divided by tokens - 1), as the official
    TreePO code (verl's ``masked_whiten``, unbiased) does; a single token has variance 0. Sequences
    with zero tokens keep a value but do not count."""
    if len(advantages) != len(token_counts):
        raise ValueError(f"{len(advantages)} advantages but {len(token_counts)} token counts")
    if any(c < 0 for c in token_counts):
        raise ValueError("token counts must be >= 0")
    total = sum(token_counts)
    if total == 0:
        return [0.0 for _ in advantages]
    mean = sum(a * c for a, c in zip(advantages, token_counts)) / total
    var = sum(c * (a - mean) ** 2 for a, c in zip(advantages, token_counts)) / max(1, total - 1)
    scale = 1.0 / math.sqrt(var + eps)
    return [(a - mean) * scale for a in advantages]


def has_signal(rewards: Sequence[float], tol: float = 1e-9) -> bool:
    """False when all rewards of a prompt are equal (no learning signal: dynamic sampling drops
    such prompts)."""
    return len(rewards) > 1 and max(rewards) - min(rewards) > tol


def filter_informative(
    items: Sequence[T], rewards: Sequence[Sequence[float]]
) -> tuple[list[T], int]:
    """Keep the items (trees) whose rewards differ; returns (kept, number dropped)."""
    kept = [item for item, r in zip(items, rewards) if has_signal(r)]
    return kept, len(items) - len(kept)
