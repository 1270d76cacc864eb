"""The learner's ledger and the run audit, on hand-made states (no Redis, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from learner.ledger import Ledger, audit, prompt_id


def test_admit_readmit_finish_and_overdue() -> None:
    ledger = Ledger()
    for pos in range(3):
        ledger.admit(prompt_id(pos), pos, f"{pos}-0", now=100.0 + pos)
    assert [a.prompt_id for a in ledger.overdue(now=111.5, after_s=10)] == ["q0", "q1"]
    ledger.readmit("q0", "9-0", now=112.0, stale=False)
    ledger.readmit("q1", "9-1", now=112.0, stale=True)
    a = ledger.outstanding["q0"]
    assert (a.entry_id, a.admitted_at, a.attempts) == ("9-0", 112.0, 2)
    assert [a.prompt_id for a in ledger.overdue(now=113.0, after_s=10)] == ["q2"]
    ledger.finish("q0", "trained")
    ledger.finish("q2", "no_signal")
    assert [ledger.status(p) for p in ("q0", "q1", "q2", "q9")] == [
        "finished",
        "outstanding",
        "finished",
        "unknown",
    ]
    again = Ledger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert again == ledger
    assert (again.readmitted_lost, again.readmitted_stale) == (1, 1)
    assert again.count("trained") == again.count("no_signal") == 1


def write_run(work: Path, state: dict, steps: list[dict]) -> None:  # type: ignore[type-arg]
    ckpt = work / "checkpoints" / f"step-{state['step']:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps(state))
    (work / "checkpoints" / "LATEST").write_text(ckpt.name)
    (work / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))


def test_audit_finds_lost_prompts_and_double_training(tmp_path: Path) -> None:
    ledger = Ledger()
    for pos in range(6):
        ledger.admit(prompt_id(pos), pos, f"{pos}-0", 0.0)
    for pos, outcome in ((0, "trained"), (1, "trained"), (2, "no_signal"), (3, "abandoned")):
        ledger.finish(prompt_id(pos), outcome)  # type: ignore[arg-type]
    del ledger.outstanding["q5"]  # q4 outstanding; q5 vanished: lost
    state = {"step": 2, "cursor": 6, "ledger": ledger.to_json()}
    steps = [
        {"step": 1, "tree_ids": ["t-q0"]},
        {"step": 2, "tree_ids": ["t-q1"]},
        {"step": 3, "tree_ids": ["t-q1"]},  # past the checkpoint: not durable, not counted
    ]
    write_run(tmp_path / "a", state, steps)
    result = audit(tmp_path / "a")
    assert (result.admitted, result.trained, result.no_signal, result.abandoned) == (6, 2, 1, 1)
    assert result.outstanding == 1 and result.lost == [5] and result.trained_twice == []
    assert not result.ok
    steps[2]["step"] = 2  # the same tree in two durable steps
    ledger.admit("q5", 5, "5-0", 0.0)
    write_run(tmp_path / "b", {**state, "ledger": ledger.to_json()}, steps)
    result = audit(tmp_path / "b")
    assert result.lost == [] and result.trained_twice == ["t-q1"] and not result.ok
