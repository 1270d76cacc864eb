"""The learner's rules, as pure functions (no DeepSpeed, no Redis): what to do with a received
tree, and how stale a tree is. ``learner/process.py`` applies the verdicts."""

from __future__ import annotations

from collections.abc import Container
from typing import Literal

from learner.ledger import Status, prompt_id
from pipeline.treepo.advantage import has_signal
from pipeline.wire.messages import TreeRollout

Verdict = Literal[
    "ready", "before_restart", "unknown", "sampling", "duplicate", "stale", "no_signal"
]
"""``ready``: train on it; ``before_restart``: its prompt's position will be admitted (and
sampled) again after a learner crash, drop it as a duplicate; ``unknown``: never admitted,
dead-letter; ``sampling``: sampled with settings the learner cannot train on (top-p < 1),
dead-letter (the prompt stays outstanding); ``duplicate``: its prompt is resolved or already has a tree;
``stale``: older than ``max_staleness``; ``no_signal``: every leaf has the same reward (dropped
under dynamic sampling)."""


def staleness(tree: TreeRollout, version: int) -> int:
    """Versions between the learner's ``version`` and the oldest segment of ``tree``."""
    oldest = min((n.policy_version for n in tree.nodes), default=version)
    return version - oldest


def triage(
    tree: TreeRollout,
    status: Status,
    cursor: int,
    trained: Container[str],
    waiting: Container[str],
    version: int,
    max_staleness: int,
    dynamic_sampling: bool,
) -> Verdict:
    """The verdict on one received tree. ``status`` is its prompt's status in the ledger,
    ``cursor`` the next dataset position to admit, ``trained`` the ids of the trees already
    trained, ``waiting`` the prompts that already have a tree waiting for a batch."""
    if status == "unknown":
        pos = tree.dataset_position
        restarted = pos >= cursor and tree.prompt_id == prompt_id(pos)
        return "before_restart" if restarted else "unknown"
    if tree.top_p != 1.0:
        return "sampling"
    if status == "finished" or tree.tree_id in trained or tree.prompt_id in waiting:
        return "duplicate"
    if staleness(tree, version) > max_staleness:
        return "stale"
    if dynamic_sampling and not has_signal([leaf.reward for leaf in tree.leaves]):
        return "no_signal"
    return "ready"


def leaf_summary(rewards: list[float]) -> tuple[float, float]:
    """Mean reward and fraction of positive rewards (correct leaves) of non-empty ``rewards``."""
    return sum(rewards) / len(rewards), sum(r > 0 for r in rewards) / len(rewards)
