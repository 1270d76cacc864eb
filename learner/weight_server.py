"""Weight versions on the learner side: write, serve over HTTP, announce.

``WeightStore.publish(version, write)`` lets ``write(dir)`` put safetensors files (HF layout)
into a fresh directory, adds ``manifest.json``, moves the directory into place atomically as
``<root>/v<version>`` and deletes versions beyond the last ``keep``. ``add_routes`` serves
``/weights/{version}/{file}`` (bearer token when configured) from the same aiohttp app that
serves ``/metrics`` and ``/healthz``. ``announce`` sets the run's weights key and publishes the
same ``WeightAnnouncement`` on its pub/sub channel.
"""

from __future__ import annotations

import hmac
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from pipeline.fsutil import staged_dir
from pipeline.messages import WeightAnnouncement, encode
from pipeline.streams import Streams
from pipeline.weights import (
    MANIFEST,
    Manifest,
    announcement_signature,
    sha256_bytes,
    write_manifest,
)

log = logging.getLogger(__name__)


class WeightStore:
    """The directory of published versions."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def versions(self) -> list[int]:
        out = []
        for d in self.root.glob("v*"):
            if d.name[1:].isdigit() and (d / MANIFEST).is_file():
                out.append(int(d.name[1:]))
        return sorted(out)

    def publish(self, version: int, write: Callable[[Path], None]) -> tuple[Manifest, bytes]:
        """Write one version (``write`` fills the directory with safetensors files)."""
        with staged_dir(self.path(version)) as tmp:
            write(tmp)
            manifest, data = write_manifest(tmp, version)
        for old in self.versions()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return manifest, data

    def manifest_bytes(self, version: int) -> bytes:
        return (self.path(version) / MANIFEST).read_bytes()


def add_routes(app: web.Application, store: WeightStore, token: str | None = None) -> None:
    """Serve ``/weights/{version}/{file}`` from ``store``; with ``token``, require
    ``Authorization: Bearer <token>``."""

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
        allowed = {MANIFEST} | {
            f.name for f in Manifest.from_bytes(manifest_path.read_bytes()).files
        }
        if name not in allowed:
            raise web.HTTPNotFound(text="no such file in this version")
        return web.FileResponse(directory / name)

    app.router.add_get("/weights/{version}/{name}", serve)


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
