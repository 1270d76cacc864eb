"""Proof that a weight swap took: after each swap the sampler scores the version's canary (the
learner's log-probs of a short fixed token sequence under that version, in its manifest)
through its engine and compares.

The swap took when the engine's log-probs are within ``canary_tolerance`` (mean absolute
difference, nats) of the version's and no farther from them than from the previous version's
canary (an engine that kept the old weights is nearer the old canary). The tolerance allows for
the learner and the engine computing in different precisions and kernels: the fp32 CPU engine
against the fp32 learner differs by under 1e-3 (tests/test_canary.py), SmolLM2-135M's weights
in bf16 against fp32 by 0.043 nats on average (0.20 at most on one token); the default
tolerance is 0.1.

Until a swap is proven no tree is published (``gate``); a tree that was growing when a swap
failed is never published (its later tokens were not sampled by the version they are labelled
with): its prompt goes back. A failed version is swapped in again, and after
``canary_attempts`` failures the sampler stops with an error.
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

from pipeline.errors import WeightVerificationError
from pipeline.weights.manifest import MANIFEST, Canary, Manifest
from workers.engine import VLLMPathGenerator
from workers.metrics import SamplerMetrics

log = logging.getLogger(__name__)


class CanaryFailed(RuntimeError):
    """A weight version did not take in the engine after every attempt."""


def mismatch(got: list[float], want: tuple[float, ...]) -> float:
    """Mean absolute difference of two log-prob sequences (inf when they do not pair up)."""
    if len(got) != len(want) or not got:
        return math.inf
    return sum(abs(a - b) for a, b in zip(got, want)) / len(got)


class CanaryCheck:
    def __init__(
        self,
        engine: VLLMPathGenerator,
        metrics: SamplerMetrics,
        tolerance: float,
        attempts: int,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.tolerance = tolerance
        self.attempts = attempts
        self.gate = asyncio.Event()
        """Set while no swap waits for its proof: trees may be published."""
        self.gate.set()
        self.failures = 0
        """Failed swaps so far (a tree compares it before and after it grew)."""
        self.last: Canary | None = None
        """The canary of the newest version proven in the engine."""
        self._attempts: dict[int, int] = {}

    async def check(self, version: int, directory: Path) -> bool:
        """Prove the swap of ``version`` just made (the gate was closed before it); True if it
        took. A failure stages the version again; the last allowed one raises ``CanaryFailed``."""
        canary = _canary_of(directory)
        if canary is None:  # a publisher without canaries: nothing to compare
            self.gate.set()
            return True
        got = await self.engine.score(list(canary.token_ids))
        err = mismatch(got, canary.logprobs)
        old = self.last
        err_old = mismatch(got, old.logprobs) if old and old.token_ids == canary.token_ids else None
        self.metrics.canary_mismatch.set(err)
        if err <= self.tolerance and (err_old is None or err <= err_old):
            self.last = canary
            self._attempts.pop(version, None)
            self.gate.set()
            return True
        self.failures += 1
        n = self._attempts[version] = self._attempts.get(version, 0) + 1
        self.metrics.canary_failures.inc()
        nearer = f"; {err_old:.4f} from the previous version's" if err_old is not None else ""
        log.error(
            "weights v%d did not take: the engine's canary log-probs are %.4f nats from the "
            "learner's (tolerance %.4f%s); trees grown across the swap are dropped, attempt %d/%d",
            version, err, self.tolerance, nearer, n, self.attempts,
        )  # fmt: skip
        if n >= self.attempts:
            raise CanaryFailed(f"weights v{version} did not take after {n} swaps")
        self.engine.stage_weights(version, directory)
        return False


def _canary_of(directory: Path) -> Canary | None:
    try:
        return Manifest.from_bytes((directory / MANIFEST).read_bytes()).canary
    except (OSError, WeightVerificationError):
        return None
