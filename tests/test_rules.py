"""The learner's pure rules (learner/rules.py): the verdict on every kind of received tree."""

from __future__ import annotations

from dataclasses import replace

import pytest

from learner.ledger import prompt_id
from learner.rules import staleness, triage
from pipeline.wire.messages import RolloutLeaf, RolloutNode, TreeRollout


def tree(position: int = 3, versions: tuple[int, ...] = (5, 6), rewards=(1.0, -1.0)) -> TreeRollout:  # type: ignore[no-untyped-def]
    nodes = [RolloutNode(-1, [1], [-0.1], versions[0])]
    nodes += [RolloutNode(0, [2], [-0.2], v) for v in versions[1:]]
    leaves = [RolloutLeaf(i + 1, r, "eos") for i, r in enumerate(rewards)]
    pid = prompt_id(position)
    return TreeRollout(
        [9], nodes, leaves, tree_id=f"t-{pid}", prompt_id=pid, dataset_position=position
    )


def verdict(t: TreeRollout, status: str = "outstanding", **kw: object) -> str:
    args: dict[str, object] = dict(
        cursor=10, trained=set(), waiting=set(), version=6, max_staleness=1, dynamic_sampling=True
    )
    args.update(kw)
    return triage(t, status, **args)  # type: ignore[arg-type]


def test_staleness_is_measured_from_the_oldest_segment() -> None:
    assert staleness(tree(versions=(5, 6, 4)), 6) == 2
    assert staleness(tree(versions=(6, 6)), 6) == 0


@pytest.mark.parametrize(
    ("t", "status", "kw", "expected"),
    [
        (tree(), "outstanding", {}, "ready"),
        (tree(), "finished", {}, "duplicate"),
        (tree(), "outstanding", {"trained": {"t-" + prompt_id(3)}}, "duplicate"),
        (tree(), "outstanding", {"waiting": {prompt_id(3)}}, "duplicate"),
        (tree(versions=(4, 6)), "outstanding", {}, "stale"),
        (tree(versions=(5, 6)), "outstanding", {}, "ready"),  # exactly at the bound
        (tree(versions=(5, 6)), "outstanding", {"max_staleness": 0}, "stale"),
        (tree(rewards=(1.0, 1.0)), "outstanding", {}, "no_signal"),
        (tree(rewards=(1.0, 1.0)), "outstanding", {"dynamic_sampling": False}, "ready"),
        (tree(position=12), "unknown", {}, "before_restart"),  # past the cursor: re-admitted
        (tree(position=3), "unknown", {}, "unknown"),
        (replace(tree(position=12), prompt_id="other"), "unknown", {}, "unknown"),
        (replace(tree(), top_p=0.9), "outstanding", {}, "sampling"),
        (replace(tree(), top_p=0.9), "finished", {}, "sampling"),
        (replace(tree(versions=(1, 6)), top_p=0.9), "outstanding", {}, "sampling"),
    ],
)
def test_triage(t: TreeRollout, status: str, kw: dict[str, object], expected: str) -> None:
    assert verdict(t, status, **kw) == expected


def test_the_drop_log_says_why_the_learner_waits(caplog) -> None:  # type: ignore[no-untyped-def]
    """Drops are summarised in one line at most every ``every_s`` (how many, why, since when),
    and a step starts the count again."""
    import logging

    from learner.intake import DropLog

    drops = DropLog(batch=8, every_s=0.0)
    drops.maybe_log(0)
    assert not caplog.records  # nothing dropped: nothing said
    for reason in ["no_signal"] * 5 + ["stale"] * 2:
        drops.add(reason)
    with caplog.at_level(logging.WARNING, logger="learner.process"):
        drops.maybe_log(3)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("waiting for trees: 7 dropped since ")
    assert "5 no signal: every leaf had the same reward; 2 stale" in line
    assert line.endswith("3 of 8 ready for the next step")
    drops.reset()
    assert drops.since is None and not drops.counts
    quiet = DropLog(batch=8, every_s=3600.0)
    quiet.add("stale")
    caplog.clear()
    quiet.maybe_log(0)
    assert not caplog.records  # within the interval: no second line
