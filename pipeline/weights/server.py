"""Weight versions: write, serve over HTTP, announce.

``WeightStore.publish(version, write)`` lets ``write(dir)`` put safetensors files (HF layout)
into a fresh directory, encodes each file as a delta against the previous version when that is
smaller (``pipeline.weights.delta``; a full version only every ``full_every`` versions), hashes
everything once (piece digests, ``weights.piece_digest``) into ``manifest.json`` with the
machine and directory it was written to, moves the directory into place atomically as
``<root>/v<version>`` and deletes versions beyond the last ``keep``.

``add_routes`` serves ``/weights/{version}/{file}`` (bearer token when configured; HTTP ranges;
the file's bytes go out by ``sendfile``, never through Python) from the same aiohttp app that
serves ``/metrics`` and ``/healthz``. The learner serves its store; every sampler serves the
versions it verified (a relay), with the same routes and token. ``slots`` bounds the receivers a
process serves at once (a receiver names itself in a header and keeps its slot from its first
piece to its last); the others get 503 and take their pieces from another source, so the
learner sends each version about ``slots`` times whatever the number of samplers. ``announce`` sets the
run's weights key and publishes the same ``WeightAnnouncement`` on its pub/sub channel.
"""

from __future__ import annotations

import hmac
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from pipeline.fsutil import staged_dir
from pipeline.weights import delta as codec
from pipeline.weights.manifest import (
    CHUNK_BYTES,
    DIGESTS,
    MANIFEST,
    RECEIVER_HEADER,
    Canary,
    Delta,
    Manifest,
    announcement_signature,
    delta_name,
    hash_file,
    machine_id,
    sha256_bytes,
    write_manifest,
)
from pipeline.wire.messages import WeightAnnouncement, encode
from pipeline.wire.streams import Streams

log = logging.getLogger(__name__)


class WeightStore:
    """The directory of published versions (the learner's; a sampler's verified ones)."""

    def __init__(
        self,
        root: Path,
        keep: int = 3,
        full_every: int = 10,
        delta_max_ratio: float = 0.5,
        chunk_bytes: int = CHUNK_BYTES,
        digest: str = DIGESTS[0],
    ) -> None:
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes
        self.digest = digest
        """Piece digest of the manifests this store writes (``pipeline.weights.manifest.DIGESTS``)."""
        self.last_delta_bytes: int | None = None
        """Size of the delta the newest ``publish`` computed, offered or not (None: none was
        computed: a full version by schedule, or a different layout)."""
        self.keep = keep
        self.full_every = full_every
        """Every this many versions no delta is offered (0: never a delta)."""
        self.delta_max_ratio = delta_max_ratio
        """A delta is offered only when it is at most this fraction of the full bytes: rebuilding
        costs a pass over the whole file, which a small delta repays on any link and a large one
        does not (bench/weight_sync.py)."""
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def versions(self) -> list[int]:
        out = []
        for d in self.root.glob("v*"):
            if d.name[1:].isdigit() and (d / MANIFEST).is_file():
                out.append(int(d.name[1:]))
        return sorted(out)

    def publish(
        self, version: int, write: Callable[[Path], None], canary: Canary | None = None
    ) -> tuple[Manifest, bytes]:
        """Write one version (``write`` fills the directory with safetensors files; ``canary``
        goes into its manifest)."""
        final = self.path(version)
        with staged_dir(final) as tmp:
            write(tmp)
            delta = self._delta(tmp, version)
            manifest, data = write_manifest(
                tmp,
                version,
                origin=(machine_id(), str(final.resolve())),
                delta=delta,
                chunk_bytes=self.chunk_bytes,
                algorithm=self.digest,
                canary=canary,
            )
        for old in self.versions()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        if delta is not None:
            sent = sum(f.size for f in delta.files)
            log.info(
                "v%d: delta against v%d is %d bytes (%.1f%% of %d)",
                version,
                delta.base,
                sent,
                100 * sent / max(1, manifest.total_bytes),
                manifest.total_bytes,
            )
        return manifest, data

    def _delta(self, tmp: Path, version: int) -> Delta | None:
        """Delta files of the new version against the newest older one, when all files have one
        and together they are small enough."""
        self.last_delta_bytes = None
        older = [v for v in self.versions() if v < version]
        if not older or not self.full_every or version % self.full_every == 0:
            return None
        base = older[-1]
        full = sorted(tmp.glob("*.safetensors"))
        patches, total, sent = [], 0, 0
        for path in full:
            old = self.path(base) / path.name
            if not old.is_file():
                return None
            new_bytes, old_bytes = path.read_bytes(), old.read_bytes()
            if not codec.same_layout(old_bytes, new_bytes):
                return None
            patch = tmp / delta_name(base, path.name)
            codec.write_delta_file(patch, codec.encode(old_bytes, new_bytes), base, path.name)
            patches.append(patch)
            total += len(new_bytes)
            sent += patch.stat().st_size
        self.last_delta_bytes = sent
        if sent > self.delta_max_ratio * total:
            log.info(
                "v%d: no delta offered (it would be %.0f%% of the bytes, above %.0f%%)",
                version,
                100 * sent / max(1, total),
                100 * self.delta_max_ratio,
            )
            for patch in patches:
                patch.unlink()
            return None
        return Delta(base, tuple(hash_file(p, self.chunk_bytes, self.digest) for p in patches))

    def manifest_bytes(self, version: int) -> bytes:
        return (self.path(version) / MANIFEST).read_bytes()


@dataclass
class ServeCounters:
    """What a weight server sent, and to whom it is sending now."""

    bytes_sent: int = 0
    responses: int = 0
    busy: int = 0
    receivers: dict[str, list[float]] = field(default_factory=dict)
    """Receiver id -> [responses in flight, when its last one ended] (a receiver holds its slot
    while it has a response in flight and for ``LEASE_S`` after)."""

    def admit(self, receiver: str, slots: int) -> bool:
        """Whether ``receiver`` may be served now (at most ``slots`` receivers at a time)."""
        now = time.monotonic()
        for key, (inflight, last) in list(self.receivers.items()):
            if not inflight and now - last > LEASE_S:
                del self.receivers[key]
        if receiver in self.receivers or not slots or len(self.receivers) < slots:
            self.receivers.setdefault(receiver, [0, now])
            return True
        self.busy += 1
        return False


LEASE_S = 0.2
"""How long a receiver keeps its slot after its last piece (it is about to ask for the next)."""


class _CountedFile(web.FileResponse):
    """A file response that holds its receiver's slot while it sends (``sendfile``)."""

    def __init__(self, path: Path, served: ServeCounters, receiver: str) -> None:
        super().__init__(path)
        self.served = served
        self.receiver = receiver

    async def prepare(self, request: web.BaseRequest) -> Any:
        lease = self.served.receivers.setdefault(self.receiver, [0, time.monotonic()])
        lease[0] += 1
        try:
            return await super().prepare(request)
        finally:
            lease[0] -= 1
            lease[1] = time.monotonic()
            self.served.responses += 1
            self.served.bytes_sent += self.content_length or 0


def add_routes(
    app: web.Application,
    store: WeightStore,
    token: str | None = None,
    *,
    slots: int = 0,
    counters: ServeCounters | None = None,
) -> ServeCounters:
    """Serve ``/weights/{version}/{file}`` from ``store``; with ``token``, require
    ``Authorization: Bearer <token>``; with ``slots``, answer 503 beyond that many file
    responses at once (the receiver takes the piece from another source)."""
    served = counters or ServeCounters()

    async def serve(request: web.Request) -> web.StreamResponse:
        if token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise web.HTTPUnauthorized(text="missing or wrong bearer token")
        version = request.match_info["version"]
        name = request.match_info["name"]
        if not version.isdigit():
            raise web.HTTPNotFound(text="no such version")
        directory = store.path(int(version))
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise web.HTTPNotFound(
                text=f"version {version} is not served (kept: {store.versions()})"
            )
        if name == MANIFEST:
            return web.Response(body=manifest_path.read_bytes(), content_type="application/json")
        if name not in Manifest.from_bytes(manifest_path.read_bytes()).served_names():
            raise web.HTTPNotFound(text="no such file in this version")
        receiver = request.headers.get(RECEIVER_HEADER) or f"anonymous-{id(request)}"
        if not served.admit(receiver, slots):
            raise web.HTTPServiceUnavailable(text="busy", headers={"Retry-After": "0"})
        return _CountedFile(directory / name, served, receiver)

    app.router.add_get("/weights/{version}/{name}", serve)
    return served


async def announce(
    streams: Streams,
    version: int,
    base_url: str,
    manifest_data: bytes,
    total_bytes: int,
    token: str | None = None,
) -> WeightAnnouncement:
    """Tell samplers about a version: set the weights key and publish on its channel. With a
    token the announcement is signed (HMAC), so samplers can tell it from a forged one."""
    ann = WeightAnnouncement(
        version,
        f"{base_url.rstrip('/')}/weights/{version}",
        sha256_bytes(manifest_data),
        total_bytes,
        time.time(),
    )
    if token is not None:
        ann.signature = announcement_signature(ann, token)
    await streams.announce_weights(encode(ann))
    log.info("announced weights v%d at %s (%d bytes)", version, ann.url, total_bytes)
    return ann
