"""What the learner keeps between steps and across restarts (``LearnerState``, in every
checkpoint) and what it resolved since its last step record (``Resolved``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from learner.ledger import Ledger


@dataclass
class LearnerState:
    """What a checkpoint restores besides weights and optimizer."""

    step: int = 0
    cursor: int = 0
    """Prompts admitted so far (the next dataset position)."""
    trained: set[str] = field(default_factory=set)
    dropped_stale: int = 0
    dropped_no_signal: int = 0
    python_rng: Any = None
    tokens_received: int = 0
    """Decoded tokens of every tree received (trained, dropped or duplicate)."""
    ledger: Ledger = field(default_factory=Ledger)
    """Every admitted prompt until its tree is resolved."""

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "version": self.step,
            "cursor": self.cursor,
            "resolved": len(self.ledger.finished),
            "trained": sorted(self.trained),
            "dropped_stale": self.dropped_stale,
            "dropped_no_signal": self.dropped_no_signal,
            "python_rng": self.python_rng,
            "tokens_received": self.tokens_received,
            "ledger": self.ledger.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LearnerState:
        return cls(
            d["step"],
            d["cursor"],
            set(d["trained"]),
            d["dropped_stale"],
            d["dropped_no_signal"],
            d.get("python_rng"),
            d.get("tokens_received", 0),
            Ledger.from_json(d.get("ledger", {})),
        )


@dataclass
class Resolved:
    """Ids resolved since the last step record (they go into the step log)."""

    no_signal: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    readmitted: list[str] = field(default_factory=list)
