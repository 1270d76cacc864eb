"""The learner's ledger of admitted prompts: end-to-end delivery, not stream-level luck.

Every prompt the learner admits stays *outstanding* until a tree for it is resolved: trained,
dropped for carrying no signal, or abandoned after ``max_admissions`` admissions. A prompt whose
tree is overdue (lost to a Redis crash that dropped the last second of entries, a lost XADD, a
sampler that died after acking) or whose tree arrived too stale is admitted again under the same
prompt id, so the tree id is the same and the learner's dedupe keeps it from being trained twice.
The ledger is part of the learner's checkpoint; ``audit`` checks a finished run from the outside.

Pure bookkeeping: no Redis, no torch. ``learner.process`` decides when to call what.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.checkpoints import latest_checkpoint

Outcome = Literal["trained", "no_signal", "abandoned"]
Status = Literal["outstanding", "finished", "unknown"]


def prompt_id(position: int) -> str:
    """The id of the prompt at a dataset position (the same on every admission)."""
    return f"q{position}"


@dataclass
class Admission:
    """One outstanding prompt."""

    prompt_id: str
    position: int
    """Dataset position (the prompt's place in the epoch)."""
    entry_id: str
    """Id of its latest entry on the prompts stream."""
    admitted_at: float
    """Wall-clock time of the latest admission (survives a learner restart)."""
    attempts: int = 1
    """Admissions so far, the first included."""


@dataclass
class Ledger:
    outstanding: dict[str, Admission] = field(default_factory=dict)
    finished: dict[str, Outcome] = field(default_factory=dict)
    """Prompt id -> how it was resolved."""
    readmitted_lost: int = 0
    readmitted_stale: int = 0

    def admit(self, prompt_id: str, position: int, entry_id: str, now: float) -> None:
        self.outstanding[prompt_id] = Admission(prompt_id, position, entry_id, now)

    def readmit(self, prompt_id: str, entry_id: str, now: float, stale: bool) -> None:
        a = self.outstanding[prompt_id]
        a.entry_id, a.admitted_at, a.attempts = entry_id, now, a.attempts + 1
        if stale:
            self.readmitted_stale += 1
        else:
            self.readmitted_lost += 1

    def status(self, prompt_id: str) -> Status:
        if prompt_id in self.outstanding:
            return "outstanding"
        return "finished" if prompt_id in self.finished else "unknown"

    def finish(self, prompt_id: str, outcome: Outcome) -> None:
        self.outstanding.pop(prompt_id, None)
        self.finished[prompt_id] = outcome

    def overdue(self, now: float, after_s: float) -> list[Admission]:
        return [a for a in self.outstanding.values() if now - a.admitted_at >= after_s]

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.finished.values() if o == outcome)

    def to_json(self) -> dict[str, Any]:
        return {
            "outstanding": [asdict(a) for a in self.outstanding.values()],
            "finished": self.finished,
            "readmitted_lost": self.readmitted_lost,
            "readmitted_stale": self.readmitted_stale,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Ledger:
        return cls(
            {a["prompt_id"]: Admission(**a) for a in d.get("outstanding", [])},
            dict(d.get("finished", {})),
            int(d.get("readmitted_lost", 0)),
            int(d.get("readmitted_stale", 0)),
        )


@dataclass
class Audit:
    """What a finished run's learner state and step log say about every admitted prompt."""

    admitted: int
    trained: int
    no_signal: int
    abandoned: int
    outstanding: int
    lost: list[int]
    """Dataset positions admitted but neither resolved nor outstanding."""
    trained_twice: list[str]
    """Tree ids that more than one step of the step log trained."""

    @property
    def ok(self) -> bool:
        return not self.lost and not self.trained_twice


def audit(work_dir: Path) -> Audit:
    """Check a learner's run folder: every admitted dataset position is trained, dropped for no
    signal, abandoned (each counted) or still outstanding; no tree is trained by two steps."""
    checkpoint = latest_checkpoint(work_dir / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint under {work_dir / 'checkpoints'}")
    state = json.loads((checkpoint / "state.json").read_text())
    ledger = Ledger.from_json(state.get("ledger", {}))
    steps = work_dir / "steps.jsonl"
    records = (
        [json.loads(line) for line in steps.read_text().splitlines()] if steps.exists() else []
    )
    seen: set[str] = set()
    twice: list[str] = []
    for r in records:
        if r["step"] > state["step"]:
            continue  # not durable (the learner truncates these on resume)
        for tree_id in r.get("tree_ids", []):
            if tree_id in seen:
                twice.append(tree_id)
            seen.add(tree_id)
    resolved = set(ledger.finished) | set(ledger.outstanding)
    lost = [pos for pos in range(state["cursor"]) if prompt_id(pos) not in resolved]
    return Audit(
        admitted=state["cursor"],
        trained=ledger.count("trained"),
        no_signal=ledger.count("no_signal"),
        abandoned=ledger.count("abandoned"),
        outstanding=len(ledger.outstanding),
        lost=lost,
        trained_twice=twice,
    )
