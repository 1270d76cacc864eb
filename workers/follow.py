"""A sampler's view of the learner's weights: read announcements, fetch and verify, stage.

Trust: an announcement is acted on only once it passes ``check_announcement`` (its HMAC under
the run's weight token when one is configured; its URL under ``weights.public_url`` when that is
set), so a forged announcement neither triggers a download nor receives the bearer token. The
version a sampler measures its staleness against is the newest one it *verified*, never merely
the newest announced: an announcement that cannot be fetched or verified cannot stall sampling
(while a version more than ``max_staleness`` ahead is still being fetched, the sampler claims no
new prompt, ``too_far_behind``).
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
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.aio import wait_or_stop
from pipeline.config import SamplerOptions, SamplerSettings
from pipeline.errors import (
    MessageDecodeError,
    WeightDownloadError,
    WeightVerificationError,
)
from pipeline.weights.hostshare import HostShare, shared_fetch
from pipeline.weights.manifest import MANIFEST, check_announcement, tensor_specs
from pipeline.weights.transfer import FetchStats, Sources, fetch_version
from pipeline.wire.messages import WeightAnnouncement, decode_as
from pipeline.wire.streams import Streams
from workers.canary import CanaryCheck
from workers.engine import VLLMPathGenerator, read_weights
from workers.metrics import SamplerMetrics

log = logging.getLogger(__name__)

CANARY_DEFAULTS = {
    k: SamplerOptions.model_fields[k].default for k in ("canary_tolerance", "canary_attempts")
}
"""The sampler settings' own defaults, for a follower built without settings (tests, tools)."""

BACKOFF_MAX_S = 60.0
LOUD_AFTER_ATTEMPTS = 3
"""A download failing this many times in a row is logged as an error (before: a warning)."""


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
        worker_id: str = "",
        relay_url: str = "",
        parallel: int = 4,
        link: bool = True,
        share: HostShare | None = None,
        canary: CanaryCheck | None = None,
        from_memory: bool = False,
    ) -> None:
        self.streams = streams
        self.from_memory = from_memory
        """Swap versions in from memory (``SamplerOptions.swap_from_memory``)."""
        self.canary = canary or CanaryCheck(
            engine, metrics, CANARY_DEFAULTS["canary_tolerance"], CANARY_DEFAULTS["canary_attempts"]
        )
        """Proves each swap (``workers.canary``)."""
        self.engine = engine
        self.metrics = metrics
        self.work_dir = work_dir
        self.reference = reference
        self.token = token
        self.trusted_url = trusted_url
        self.download_timeout_s = download_timeout_s
        self.max_staleness = max_staleness
        self.unhealthy_after_s = unhealthy_after_s
        self.worker_id = worker_id
        self.relay_url = relay_url
        """Where this sampler serves the versions it verified ('' = no relaying)."""
        self.parallel = parallel
        self.link = link
        self.share = share
        """Fetch each version once per machine (``pipeline.weights.hostshare``); None = on its own."""
        self.last_fetch: FetchStats | None = None
        self.verified = engine.policy_version
        """Newest version fetched, verified and staged (the staleness reference)."""
        self.announced = engine.policy_version
        """Newest version announced with a valid signature (for health and metrics only)."""
        self.current = engine.policy_version
        """The version in the announcement key when last read (a restarted learner announces
        the version it resumed at, which may be lower than ``announced``)."""
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
        worker_id: str = "",
        relay_url: str = "",
    ) -> WeightFollower:
        """The follower of a sampler process configured by ``settings``; downloads are checked
        against the tensors of the engine's model directory."""
        token = settings.weights.token
        w = settings.weights
        return cls(
            streams,
            engine,
            metrics,
            work_dir,
            tensor_specs(Path(engine.options.model)),
            token=token.get_secret_value() if token else None,
            trusted_url=w.public_url,
            download_timeout_s=w.download_timeout_s,
            max_staleness=settings.run.max_staleness,
            unhealthy_after_s=settings.sampler.unhealthy_after_s,
            worker_id=worker_id,
            relay_url=relay_url if w.relay else "",
            parallel=w.parallel,
            link=w.link_same_machine,
            share=HostShare(streams, worker_id) if w.share_same_machine else None,
            canary=CanaryCheck(
                engine, metrics, settings.sampler.canary_tolerance, settings.sampler.canary_attempts
            ),
            from_memory=settings.sampler.swap_from_memory,
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
        self.current = ann.version
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
        try:  # another sampler of this machine may be fetching it: link its copy
            async with shared_fetch(self.share, ann.version, self.download_timeout_s) as copies:
                peers: list[str] = []
                refresh = asyncio.ensure_future(self._refresh_peers(ann.version, peers))
                try:
                    _, directory, stats = await asyncio.to_thread(
                        fetch_version,
                        Sources(ann.url, lambda: list(peers)),
                        ann.manifest_sha256,
                        self.work_dir,
                        local=self.local_versions(),
                        reference=self.reference,
                        token=self.token,
                        timeout_s=self.download_timeout_s,
                        parallel=self.parallel,
                        allow_link=self.link,
                        recycle=self._spare(),
                        host_copies=copies,
                    )
                finally:
                    refresh.cancel()
                await self._advertise(ann.version, directory)  # before the lease is given back
        except (WeightDownloadError, WeightVerificationError) as exc:
            self._failed(ann, exc)
            return
        self.last_fetch = stats
        self.metrics.weight_download_seconds.observe(time.perf_counter() - started)
        self.metrics.weight_fetches.labels(stats.method).inc()
        for source, n in stats.bytes_by_source.items():
            self.metrics.weight_bytes_received.labels(
                "learner" if source == ann.url else "peer"
            ).inc(n)
        log.info(
            "weights v%d verified by %s in %.2fs (%d bytes received)",
            ann.version,
            stats.method,
            time.perf_counter() - started,
            stats.bytes_received,
        )
        tensors = None
        if self.from_memory and self.engine.in_process:  # read now, off the engine's loop
            tensors = await asyncio.to_thread(read_weights, directory)
        self.engine.stage_weights(ann.version, directory, tensors)
        self.verified = ann.version
        self.failing = {v: f for v, f in self.failing.items() if v > ann.version}

    async def _advertise(self, version: int, directory: Path) -> None:
        """Offer a verified version to peers: over HTTP (a relay) and, to the samplers of this
        machine, as a directory to link."""
        if not self.relay_url and self.share is None:
            return
        try:
            await self.streams.advertise_weights(
                self.worker_id,
                version,
                f"{self.relay_url}/weights/{version}" if self.relay_url else "",
                machine=self.share.machine if self.share is not None else "",
                directory=str(directory.resolve()) if self.share is not None else "",
            )
        except Exception as exc:  # sharing is an optimisation: never fatal (ACL, Redis)
            log.warning("cannot advertise v%d to peers: %s", version, exc)

    async def _refresh_peers(self, version: int, into: list[str], every_s: float = 0.1) -> None:
        """Keep ``into`` the relays advertising ``version`` (not this sampler) while a fetch
        runs: pieces waiting for a free source pick up peers that finished meanwhile."""
        mine = f"{self.relay_url}/weights/{version}" if self.relay_url else None
        while True:
            try:
                found = await self.streams.weight_sources(version)
                into[:] = [u for u in found if u != mine]
            except Exception:  # no peers known: the learner serves (relaying is optional)
                pass
            await asyncio.sleep(every_s)

    def _spare(self) -> Path | None:
        """The oldest version held that the engine no longer runs (its files are overwritten by
        the next download instead of being deleted)."""
        held = self.local_versions()
        old = [v for v in held if v < self.engine.policy_version]
        return held[min(old)] if old else None

    def local_versions(self) -> dict[int, Path]:
        """Verified versions this sampler holds (bases for deltas)."""
        out = {}
        for d in self.work_dir.glob("v*"):
            if d.name[1:].isdigit() and (d / MANIFEST).is_file():
                out[int(d.name[1:])] = d
        return out

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
        # a download that fails once is routine (the learner restarting or exiting, a relay
        # gone); one that keeps failing, or any failed verification, is an operator's problem
        loud = kind == "verification" or attempts >= LOUD_AFTER_ATTEMPTS
        log.log(
            logging.ERROR if loud else logging.WARNING,
            "weights v%d not taken (attempt %d, %s: %s); retry in %.0fs, keeping v%d",
            version,
            attempts,
            kind,
            exc,
            delay,
            self.engine.policy_version,
        )

    def too_far_behind(self) -> bool:
        """Whether a tree started now would be stale on arrival because this sampler is still
        catching up: the learner's current version is more than ``max_staleness`` versions ahead
        of the engine's and not (yet) failing to download or verify. The sampler claims no
        prompt while this holds: the learner would drop the tree and admit its prompt again, and
        a prompt admitted ``max_admissions`` times is abandoned. A version that failed does not
        hold sampling (``trouble()`` reports it on /healthz)."""
        if not self.canary.gate.is_set():  # a swap not (yet) proven: claim nothing
            return True
        behind = self.current - self.engine.policy_version > self.max_staleness
        return behind and self.current not in self.failing

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
        """Act on every announcement the moment it is published (pub/sub), and read the key
        as soon as each subscription is in place (an announcement made while Redis was away or
        before the subscription is only there) and every ``poll_s`` after; swap in what
        verified."""
        while not stop.is_set():
            polled = -math.inf  # the subscription's first yield reads the key
            async for message in self.streams.weight_announcements(min(poll_s, 1.0)):
                if stop.is_set():
                    return
                if message is not None or time.monotonic() - polled >= poll_s:
                    await self.poll()
                    polled = time.monotonic()
                    await self.apply_staged()
            await self.poll()  # the subscription broke: poll until it is back
            await self.apply_staged()
            await wait_or_stop(stop, min(poll_s, 1.0))

    async def apply_staged(self) -> None:
        """Swap staged weights into the engine (between engine steps), prove the swap took
        (``workers.canary``: no tree is published meanwhile) and delete older versions."""
        staged = self.engine.staged()
        if staged is not None:
            self.canary.gate.clear()
        seconds = await self.engine.apply_staged()
        if seconds is None:
            self.canary.gate.set()
        elif staged is not None:
            self.metrics.weight_swap_seconds.observe(seconds)
            self.metrics.weight_swaps.inc()
            if await self.canary.check(*staged):
                self._prune_versions()
        self.metrics.policy_version.set(self.engine.policy_version)

    def _prune_versions(self) -> None:
        """Delete downloaded versions older than the one the engine runs (never the staged one,
        nor one a swap may be reading)."""
        current = self.engine.policy_version
        for d in self.work_dir.glob("v*"):
            if d.name[1:].isdigit() and int(d.name[1:]) < current:
                shutil.rmtree(d, ignore_errors=True)
