"""A sampler's view of the learner's weights: read announcements, fetch and verify, stage.

Trust: an announcement is acted on only once it passes ``check_announcement`` (its HMAC under
the run's weight token when one is configured; its URL under ``weights.public_url`` when that is
set), so a forged announcement neither triggers a download nor receives the bearer token. The
version a sampler measures its staleness against is the newest one it *verified*, never merely
the newest announced: an announcement that cannot be fetched or verified cannot stall sampling.
A failing version is retried with exponential backoff (1 s doubling to 60 s) and reported in the
metrics; ``trouble()`` turns the sampler's ``/healthz`` not-ok once the newest signed announcement
has been out of reach for longer than ``unhealthy_after_s`` beyond the staleness bound.

The engine swap itself happens between two engine steps, as soon as a version is verified
(``VLLMPathGenerator.stage_weights`` / ``apply_staged``): running requests go on under the new
weights.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.aio import wait_or_stop
from pipeline.config import SamplerSettings
from pipeline.errors import (
    MessageDecodeError,
    WeightDownloadError,
    WeightVerificationError,
)
from pipeline.messages import WeightAnnouncement, decode_as
from pipeline.streams import Streams
from pipeline.weights import check_announcement, download_version, tensor_specs
from workers.engine import VLLMPathGenerator
from workers.metrics import SamplerMetrics

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 60.0


@dataclass
class _Failing:
    attempts: int
    retry_at: float
    error: str
    announced_at: float
    """``created_at`` of the failing announcement: a new one of the same version (a restarted
    learner publishing it again) is tried at once."""


class WeightFollower:
    """Follows announcements for one sampler; ``poll()`` is called by the sampler's loop."""

    def __init__(
        self,
        streams: Streams,
        engine: VLLMPathGenerator,
        metrics: SamplerMetrics,
        work_dir: Path,
        reference: dict[str, tuple[str, tuple[int, ...]]],
        *,
        token: str | None,
        trusted_url: str,
        download_timeout_s: float,
        max_staleness: int,
        unhealthy_after_s: float,
    ) -> None:
        self.streams = streams
        self.engine = engine
        self.metrics = metrics
        self.work_dir = work_dir
        self.reference = reference
        self.token = token
        self.trusted_url = trusted_url
        self.download_timeout_s = download_timeout_s
        self.max_staleness = max_staleness
        self.unhealthy_after_s = unhealthy_after_s
        self.verified = engine.policy_version
        """Newest version fetched, verified and staged (the staleness reference)."""
        self.announced = engine.policy_version
        """Newest version announced with a valid signature (for health and metrics only)."""
        self.failing: dict[int, _Failing] = {}
        self._refused: set[tuple[int, str]] = set()
        self._behind_since: float | None = None

    @classmethod
    def for_sampler(
        cls,
        settings: SamplerSettings,
        streams: Streams,
        engine: VLLMPathGenerator,
        metrics: SamplerMetrics,
        work_dir: Path,
    ) -> WeightFollower:
        """The follower of a sampler process configured by ``settings``; downloads are checked
        against the tensors of the engine's model directory."""
        token = settings.weights.token
        return cls(
            streams,
            engine,
            metrics,
            work_dir,
            tensor_specs(Path(engine.options.model)),
            token=token.get_secret_value() if token else None,
            trusted_url=settings.weights.public_url,
            download_timeout_s=settings.weights.download_timeout_s,
            max_staleness=settings.run.max_staleness,
            unhealthy_after_s=settings.sampler.unhealthy_after_s,
        )

    async def poll(self) -> None:
        """Read the announcement key once and act on it."""
        raw = await self.streams.latest_weights()
        if not raw:
            return
        try:
            ann = decode_as(raw, WeightAnnouncement)
            check_announcement(ann, self.token, self.trusted_url)
        except (MessageDecodeError, WeightVerificationError) as exc:
            self._refuse_announcement(raw, str(exc))
            return
        self.announced = max(self.announced, ann.version)
        self.metrics.weight_announced_version.set(self.announced)
        if ann.version > self.verified:
            await self._fetch(ann)

    def _refuse_announcement(self, raw: bytes, reason: str) -> None:
        key = (len(raw), reason)
        if key in self._refused:  # the same bad announcement, seen again at the next poll
            return
        self._refused.add(key)
        self.metrics.weight_failures.labels("announcement").inc()
        log.error("weight announcement refused: %s", reason)

    async def _fetch(self, ann: WeightAnnouncement) -> None:
        now = time.monotonic()
        failing = self.failing.get(ann.version)
        if (
            failing is not None
            and failing.announced_at == ann.created_at
            and now < failing.retry_at
        ):
            return
        started = time.perf_counter()
        try:
            _, directory = await download_version(
                ann.url,
                ann.manifest_sha256,
                self.work_dir,
                reference=self.reference,
                token=self.token,
                timeout_s=self.download_timeout_s,
            )
        except (WeightDownloadError, WeightVerificationError) as exc:
            self._failed(ann, exc)
            return
        self.metrics.weight_download_seconds.observe(time.perf_counter() - started)
        self.engine.stage_weights(ann.version, directory)
        self.verified = ann.version
        self.failing = {v: f for v, f in self.failing.items() if v > ann.version}

    def _failed(self, ann: WeightAnnouncement, exc: Exception) -> None:
        kind = "verification" if isinstance(exc, WeightVerificationError) else "download"
        version = ann.version
        previous = self.failing.get(version)
        attempts = 1 if previous is None else previous.attempts + 1
        delay = min(BACKOFF_MAX_S, 2.0 ** (attempts - 1))
        self.failing[version] = _Failing(
            attempts, time.monotonic() + delay, f"{kind}: {exc}", ann.created_at
        )
        self.metrics.weight_failures.labels(kind).inc()
        if kind == "verification":
            self.metrics.weight_rejected.inc()
        log.error(
            "weights v%d not taken (attempt %d, %s: %s); retry in %.0fs, keeping v%d",
            version,
            attempts,
            kind,
            exc,
            delay,
            self.engine.policy_version,
        )

    def trouble(self) -> str | None:
        """Why this sampler is unhealthy, or None: the newest signed announcement has been more
        than ``max_staleness`` versions ahead of the engine for ``unhealthy_after_s``."""
        behind = self.announced - self.engine.policy_version
        if behind <= self.max_staleness:
            self._behind_since = None
            return None
        now = time.monotonic()
        if self._behind_since is None:
            self._behind_since = now
        waited = now - self._behind_since
        if waited < self.unhealthy_after_s:
            return None
        last = self.failing.get(self.announced)
        why = last.error if last is not None else "not fetched yet"
        return (
            f"weights v{self.announced} announced {waited:.0f}s ago but the engine runs "
            f"v{self.engine.policy_version} ({why})"
        )

    # -- on the sampler's loop -------------------------------------------------------------------

    async def follow(self, stop: asyncio.Event, poll_s: float) -> None:
        """Poll the announcement every ``poll_s`` until ``stop``; swap in what was verified."""
        while not stop.is_set():
            await self.poll()
            await self.apply_staged()
            await wait_or_stop(stop, poll_s)

    async def apply_staged(self) -> None:
        """Swap staged weights into the engine (between engine steps) and delete older versions."""
        seconds = await self.engine.apply_staged()
        if seconds is not None:
            self.metrics.weight_swap_seconds.observe(seconds)
            self.metrics.weight_swaps.inc()
            self._prune_versions()
        self.metrics.policy_version.set(self.engine.policy_version)

    def _prune_versions(self) -> None:
        """Delete downloaded versions older than the one the engine runs (never the staged one,
        nor one a swap may be reading)."""
        current = self.engine.policy_version
        for d in self.work_dir.glob("v*"):
            if d.name[1:].isdigit() and int(d.name[1:]) < current:
                shutil.rmtree(d, ignore_errors=True)
