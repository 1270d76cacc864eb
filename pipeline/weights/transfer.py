"""Fetching one weight version: linked, rebuilt from a delta, or downloaded in verified pieces.

``fetch_version`` reads the manifest (its sha256 must match the signed announcement), then takes
the cheapest way that verifies (pieces are checked with the manifest's digest,
``pipeline.weights.manifest.DIGESTS``):

1. **same machine**: the manifest names the machine and directory the learner wrote the version
   to; a sampler on that machine hard-links the files (no bytes move; the files are the
   publisher's own, hashed when they were published) and only checks their sizes and headers.
   Likewise a verified copy another sampler of this machine holds (``host_copies``, found by
   ``pipeline.weights.hostshare``): its manifest must be the announced one, byte for byte;
2. **delta**: when the manifest offers a delta against a version this sampler holds, it fetches
   the small delta file, rebuilds the full file (``pipeline.weights.delta``) and checks the rebuilt
   file against the full file's piece digests;
3. **full**: the files in ``chunk_bytes`` pieces, several at once, each piece from any source
   that has the version (peer samplers first, the learner last), hashed as it arrives, written
   in place with ``pwrite`` from a reused buffer, and checked against its digest before it
   counts. A source that is busy (HTTP 503), fails or sends a bad piece is skipped for that
   piece; pieces already verified are kept, so a peer dying mid-transfer costs only its pieces
   in flight.

Everything lands in a staging directory that becomes ``<dest_root>/v<version>`` only when every
file verified and every safetensors header matches the engine's tensors: nothing corrupt is ever
loaded. The transfer runs on plain sockets in worker threads (``http.client``): hashing and the
socket and file calls release the GIL, so pieces proceed in parallel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException, HTTPResponse, HTTPSConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.aio import jitter
from pipeline.errors import WeightDownloadError, WeightVerificationError
from pipeline.fsutil import staged_dir
from pipeline.weights.manifest import (
    MANIFEST,
    RECEIVER_HEADER,
    FileEntry,
    Manifest,
    check_compatible,
    machine_id,
    piece_hasher,
    sha256_bytes,
    tensor_specs,
)

log = logging.getLogger(__name__)

BUFFER_BYTES = 1 << 20
BUSY_WAIT_MAX_S = 0.25
"""Longest wait before asking busy sources again (each of a receiver's workers asks on its own:
eight receivers asking every 20 ms cost the learner more than the transfer they wait for)."""


class Busy(Exception):
    """The source answered 503: it serves as many transfers as it allows."""


@dataclass
class FetchStats:
    method: str = "full"
    """``link`` (the learner's files), ``host`` (another sampler's copy on this machine),
    ``delta`` or ``full``."""
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    busy_answers: int = 0
    failed_pieces: int = 0

    @property
    def bytes_received(self) -> int:
        return sum(self.bytes_by_source.values())


@dataclass
class Sources:
    """Where the version can be fetched from: the learner's URL and the peers' (both
    ``<base>/weights/<version>``). ``peers`` is called again while pieces wait for a free
    source, so peers that finished meanwhile are used."""

    learner: str
    peers: Callable[[], list[str]] = lambda: []
    prefer_peers: bool = True

    def order(self, bad: set[str]) -> list[str]:
        """Sources to try for a piece: the peers that have the version (in random order) while
        any is left, so the learner sends a version only to the first receivers and to those
        whose peers all failed; otherwise the learner."""
        peers = [p for p in self.peers() if p not in bad and p != self.learner]
        jitter.shuffle(peers)
        if self.prefer_peers and peers:
            return peers  # busy peers are waited for, not bypassed
        return ([] if self.learner in bad else [self.learner]) + peers


def fetch_version(
    sources: Sources,
    manifest_sha256: str,
    dest_root: Path,
    *,
    local: dict[int, Path] | None = None,
    reference: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    token: str | None = None,
    timeout_s: float = 600.0,
    parallel: int = 4,
    allow_link: bool = True,
    recycle: Path | None = None,
    host_copies: list[Path] | None = None,
) -> tuple[Manifest, Path, FetchStats]:
    """Fetch and verify one version into ``dest_root/v<version>`` (blocking: run it in a
    thread). ``local`` maps versions this sampler already holds to their directories;
    ``recycle`` is an old version's directory whose files may be overwritten in place (their
    memory pages are reused: writing into fresh pages costs several times the transfer);
    ``host_copies`` are verified copies of the version other samplers on this machine hold."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    client = _Client(token, deadline)
    stats = FetchStats()
    try:
        data = client.manifest(sources)
        if sha256_bytes(data) != manifest_sha256:
            raise WeightVerificationError("manifest sha256 does not match the announcement")
        manifest = Manifest.from_bytes(data)
        final = dest_root / f"v{manifest.version}"
        with staged_dir(final) as tmp:
            if (
                not (allow_link and _link(manifest, tmp, stats))
                and not _link_copy(manifest, data, host_copies or [], tmp, stats)
                and not _rebuild(manifest, tmp, local or {}, sources, client, stats, recycle)
            ):
                stats.method = "full"
                for entry in manifest.files:
                    _reuse(recycle, entry.name, tmp / entry.name)
                    client.file(
                        sources, entry, manifest.chunk_bytes, tmp / entry.name, parallel, stats
                    )
            if reference is not None:
                check_compatible(tensor_specs(tmp), reference)
            (tmp / MANIFEST).write_bytes(data)
        stats.seconds = time.perf_counter() - started
        return manifest, final, stats
    except (WeightVerificationError, WeightDownloadError):
        raise
    except (OSError, HTTPException, TimeoutError) as exc:
        raise WeightDownloadError(f"download of {sources.learner} failed: {exc}") from exc
    finally:
        client.close()


def _reuse(old_dir: Path | None, name: str, path: Path) -> None:
    """Move an old version's file to ``path`` to be overwritten, if it is this sampler's own
    (a file hard-linked to the learner's store or to another sampler's copy is never written
    to). The link count is read after the move: a peer can link the file only while it is in
    the old version's directory, so a count of one then means nobody else holds it."""
    if old_dir is None:
        return
    old = old_dir / name
    with contextlib.suppress(OSError):
        if old.is_file() and old.stat().st_nlink == 1:
            (old_dir / MANIFEST).unlink(missing_ok=True)  # no longer a verified version
            os.replace(old, path)
            if path.stat().st_nlink != 1:  # linked by a peer just before the move
                path.unlink()


def _link(manifest: Manifest, tmp: Path, stats: FetchStats) -> bool:
    """Hard-link the publisher's files when they are on this machine."""
    if manifest.origin is None or manifest.origin[0] != machine_id():
        return False
    if not _link_files(manifest, Path(manifest.origin[1]), tmp):
        return False
    stats.method = "link"
    return True


def _link_copy(
    manifest: Manifest, data: bytes, copies: list[Path], tmp: Path, stats: FetchStats
) -> bool:
    """Hard-link a verified copy another sampler of this machine holds: one whose manifest is
    the announced one byte for byte (a sampler writes it only after every piece verified, and
    removes it before it reuses the files)."""
    for src in copies:
        try:
            if (src / MANIFEST).read_bytes() != data:
                continue
        except OSError:
            continue
        if _link_files(manifest, src, tmp):
            stats.method = "host"
            return True
    return False


def _link_files(manifest: Manifest, src: Path, tmp: Path) -> bool:
    """Hard-link every file of the version from ``src`` (sizes checked); nothing left behind
    when one is missing or cannot be linked."""
    try:
        for entry in manifest.files:
            path = src / entry.name
            size = path.stat().st_size
            if size != entry.size:
                raise OSError(f"{path.name} is {size} bytes, not {entry.size}")
            os.link(path, tmp / entry.name)
    except OSError as exc:  # gone, another filesystem, or no permission: download instead
        log.info("cannot link %s (%s); downloading", src, exc)
        for entry in manifest.files:
            (tmp / entry.name).unlink(missing_ok=True)
        return False
    return True


def _rebuild(
    manifest: Manifest,
    tmp: Path,
    local: dict[int, Path],
    sources: Sources,
    client: _Client,
    stats: FetchStats,
    recycle: Path | None,
) -> bool:
    """Rebuild the version from the base it is a delta of, when this sampler holds that base.
    False (nothing left behind) when there is no usable delta or the rebuilt file does not
    verify."""
    from pipeline.weights import delta as codec
    from pipeline.weights.manifest import delta_name

    d = manifest.delta
    if d is None or d.base not in local:
        return False
    base_dir = local[d.base]
    by_name = {f.name: f for f in d.files}
    for entry in manifest.files:
        patch = by_name.get(delta_name(d.base, entry.name))
        if patch is None or not (base_dir / entry.name).is_file():
            return False
    for entry in manifest.files:
        patch = by_name[delta_name(d.base, entry.name)]
        patch_path = tmp / patch.name
        client.file(sources, patch, manifest.chunk_bytes, patch_path, 1, stats)
        delta_bytes, _ = codec.read_delta_file(patch_path)
        patch_path.unlink()
        target = tmp / entry.name
        _reuse(recycle, entry.name, target)
        try:
            ok = _rebuild_file(
                base_dir / entry.name, delta_bytes, target, entry, manifest.chunk_bytes
            )
        except WeightVerificationError as exc:
            log.warning("delta of v%d does not apply to v%d: %s", manifest.version, d.base, exc)
            ok = False
        if not ok:
            log.warning(
                "v%d rebuilt from v%d does not verify; downloading", manifest.version, d.base
            )
            target.unlink(missing_ok=True)
            return False
    stats.method = "delta"
    return True


def _rebuild_file(
    base: Path, delta_bytes: bytes, target: Path, entry: FileEntry, chunk_bytes: int
) -> bool:
    """Write base XOR delta into ``target`` in place, hashing each piece on the way; whether
    every piece matches the manifest."""
    import mmap

    from pipeline.weights import delta as codec

    if base.stat().st_size != entry.size:
        return False
    digests: list[str] = []
    hasher = piece_hasher(entry.algorithm)
    filled = 0

    with base.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, entry.size)

            def put(offset: int, block: memoryview) -> None:
                nonlocal hasher, filled
                os.pwrite(fd, block, offset)
                at = 0
                while at < len(block):
                    take = min(len(block) - at, chunk_bytes - filled)
                    hasher.update(block[at : at + take])
                    filled += take
                    at += take
                    if filled == chunk_bytes:
                        digests.append(hasher.hexdigest())
                        hasher, filled = piece_hasher(entry.algorithm), 0

            view = memoryview(m)
            try:
                codec.apply_blocks(view, delta_bytes, put)
            finally:
                view.release()
        finally:
            os.close(fd)
    if filled or not digests:
        digests.append(hasher.hexdigest())
    return tuple(digests) == entry.pieces


class _Client:
    """HTTP/1.1 keep-alive connections per (thread, source)."""

    def __init__(self, token: str | None, deadline: float) -> None:
        self.headers = {RECEIVER_HEADER: uuid.uuid4().hex}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.deadline = deadline
        self.local = threading.local()
        self.all: list[HTTPConnection] = []
        self.lock = threading.Lock()

    def _conn(self, base: str) -> tuple[HTTPConnection, str]:
        parts = urlsplit(base)
        conns: dict[str, HTTPConnection] = self.local.__dict__.setdefault("conns", {})
        key = parts.netloc
        if key not in conns:
            left = max(1.0, self.deadline - time.monotonic())
            cls = HTTPSConnection if parts.scheme == "https" else HTTPConnection
            conns[key] = cls(parts.netloc, timeout=min(60.0, left))
            with self.lock:
                self.all.append(conns[key])
        return conns[key], parts.path.rstrip("/")

    def _drop(self, base: str) -> None:
        conns = self.local.__dict__.get("conns", {})
        conn = conns.pop(urlsplit(base).netloc, None)
        if conn is not None:
            conn.close()

    def get(self, base: str, name: str, headers: dict[str, str] | None = None) -> HTTPResponse:
        if time.monotonic() > self.deadline:
            raise WeightDownloadError("download timed out")
        conn, path = self._conn(base)
        try:
            conn.request("GET", f"{path}/{name}", headers={**self.headers, **(headers or {})})
            resp = conn.getresponse()
        except (OSError, HTTPException):
            self._drop(base)
            raise
        if resp.status == 503:
            resp.read()
            raise Busy(base)
        if resp.status == 401:
            resp.read()
            raise WeightVerificationError(f"GET {base}/{name}: HTTP 401 (bearer token refused)")
        return resp

    def manifest(self, sources: Sources) -> bytes:
        errors = []
        for _ in range(200):
            for base in [sources.learner, *sources.peers()]:
                try:
                    resp = self.get(base, MANIFEST)
                    body = resp.read()
                except Busy:
                    continue
                except (OSError, HTTPException) as exc:
                    errors.append(f"{base}: {exc}")
                    continue
                if resp.status == 200:
                    return body
                errors.append(f"{base}: HTTP {resp.status}")
            if errors:
                break
            time.sleep(0.05)
        raise WeightDownloadError(f"no source served the manifest: {'; '.join(errors[:3])}")

    def file(
        self,
        sources: Sources,
        entry: FileEntry,
        chunk_bytes: int,
        path: Path,
        parallel: int,
        stats: FetchStats,
    ) -> None:
        """Download ``entry`` into ``path`` piece by piece, ``parallel`` pieces at a time."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)  # an old file's pages are reused
        try:
            os.ftruncate(fd, entry.size)
            todo: queue.Queue[int] = queue.Queue()
            for i in range(len(entry.pieces)):
                todo.put(i)
            errors: list[BaseException] = []
            workers = [
                threading.Thread(
                    target=self._worker,
                    args=(sources, entry, chunk_bytes, fd, todo, stats, errors),
                    daemon=True,
                )
                for _ in range(max(1, min(parallel, len(entry.pieces))))
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if errors:
                raise errors[0]
        finally:
            os.close(fd)

    def _worker(
        self,
        sources: Sources,
        entry: FileEntry,
        chunk_bytes: int,
        fd: int,
        todo: queue.Queue[int],
        stats: FetchStats,
        errors: list[BaseException],
    ) -> None:
        buf = bytearray(BUFFER_BYTES)
        bad: set[str] = set()
        while not errors:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                self._piece(sources, entry, chunk_bytes, i, fd, buf, bad, stats)
            except BaseException as exc:
                errors.append(exc)
                return

    def _piece(
        self,
        sources: Sources,
        entry: FileEntry,
        chunk_bytes: int,
        i: int,
        fd: int,
        buf: bytearray,
        bad: set[str],
        stats: FetchStats,
    ) -> None:
        start = i * chunk_bytes
        end = min(entry.size, start + chunk_bytes)
        failures: list[str] = []
        waits = 0
        while True:
            order = sources.order(bad)
            if not order:
                raise WeightVerificationError(
                    f"{entry.name} piece {i}: no source left ({'; '.join(failures[-3:])})"
                )
            busy = 0
            for base in order:
                try:
                    got = self._receive(base, entry, i, start, end, fd, buf)
                except Busy:
                    busy += 1
                    with self.lock:
                        stats.busy_answers += 1
                    continue
                except (OSError, HTTPException, WeightDownloadError) as exc:
                    failures.append(f"{base}: {exc}")
                    bad.add(base)
                    with self.lock:
                        stats.failed_pieces += 1
                    continue
                except WeightVerificationError as exc:
                    failures.append(f"{base}: {exc}")
                    bad.add(base)
                    with self.lock:
                        stats.failed_pieces += 1
                    log.warning("piece %d of %s from %s refused: %s", i, entry.name, base, exc)
                    continue
                with self.lock:
                    stats.bytes_by_source[base] = stats.bytes_by_source.get(base, 0) + got
                return
            if time.monotonic() > self.deadline:
                raise WeightDownloadError(f"{entry.name} piece {i}: timed out ({failures[-1:]})")
            if busy:  # every source is serving others: ask again, less often the longer it lasts
                waits += 1
                time.sleep(min(BUSY_WAIT_MAX_S, 0.02 * 1.5**waits) * (0.5 + jitter.random()))

    def _receive(
        self, base: str, entry: FileEntry, i: int, start: int, end: int, fd: int, buf: bytearray
    ) -> int:
        resp = self.get(base, entry.name, {"Range": f"bytes={start}-{end - 1}"})
        if resp.status not in (200, 206) or (
            resp.status == 200 and (start, end) != (0, entry.size)
        ):
            resp.read()
            raise WeightDownloadError(f"HTTP {resp.status} for a range of {entry.name}")
        view = memoryview(buf)
        h = piece_hasher(entry.algorithm)
        at = start
        try:
            while at < end:
                n = resp.readinto(view[: min(len(view), end - at)])
                if not n:
                    raise WeightDownloadError(f"{entry.name}: connection closed at byte {at}")
                h.update(view[:n])
                os.pwrite(fd, view[:n], at)
                at += n
            if resp.read(1):
                raise WeightDownloadError(f"{entry.name}: more bytes than the range")
        except BaseException:
            self._drop(base)
            raise
        finally:
            view.release()
        if h.hexdigest() != entry.pieces[i]:
            raise WeightVerificationError(f"{entry.name} piece {i}: digest mismatch")
        return end - start

    def close(self) -> None:
        with self.lock:
            for conn in self.all:
                conn.close()


def download_version(
    url: str,
    manifest_sha256: str,
    dest_root: Path,
    *,
    reference: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    token: str | None = None,
    timeout_s: float = 600.0,
    **options: Any,
) -> tuple[Manifest, Path]:
    """``fetch_version`` from the learner alone (tools and tests)."""
    manifest, path, _ = fetch_version(
        Sources(url),
        manifest_sha256,
        dest_root,
        reference=reference,
        token=token,
        timeout_s=timeout_s,
        **options,
    )
    return manifest, path
