"""Weight versions end to end without an engine: deltas rebuilt bit for bit, pieces verified on
arrival from any source, corrupt or dying peers survived, busy sources shared, same-machine
links, and announcements followed over pub/sub (real aiohttp servers, real redis-server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from aiohttp import web

from pipeline.errors import WeightVerificationError
from pipeline.httpserver import start
from pipeline.weights import delta
from pipeline.weights.manifest import CHUNK_BYTES, Manifest, delta_name, hash_file, sha256_bytes
from pipeline.weights.server import ServeCounters, WeightStore, add_routes
from pipeline.weights.transfer import FetchStats, Sources, fetch_version
from tests.services import RedisServer


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file written by hand (an independent writer)."""
    names = {np.float32: "F32", np.uint16: "BF16"}
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        raw = arr.tobytes()
        header[name] = {
            "dtype": names[arr.dtype.type],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def weights(seed: int, step: float = 0.0, n: int = 300_000) -> dict[str, np.ndarray]:
    base = np.random.default_rng(0)
    out = {}
    for i, k in enumerate((n, n // 3)):
        w = base.standard_normal(k, dtype=np.float32)
        if step:
            w = w + step * np.abs(w) * np.random.default_rng(seed + i).standard_normal(k).astype(
                np.float32
            )
        out[f"layer{i}.weight"] = w.astype(np.float32)
    return out


def bf16(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in tensors.items()}


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_a_delta_rebuilds_the_new_file_bit_for_bit(kind: str) -> None:
    convert = bf16 if kind == "bf16" else (lambda t: t)
    old = safetensors_bytes(convert(weights(0)))
    new = safetensors_bytes(convert(weights(1, step=1e-3)))
    d = delta.encode(old, new)
    assert delta.apply(old, d) == new
    assert len(d) < 0.8 * len(new)  # unchanged high bytes compress
    if kind == "bf16":  # most bf16 values do not move at this step size
        assert len(d) < 0.5 * len(new)
    with pytest.raises(WeightVerificationError):
        delta.apply(old, d[: len(d) // 2])
    other = safetensors_bytes({"x": weights(0)["layer0.weight"]})
    assert not delta.same_layout(old, other)
    with pytest.raises(ValueError, match="layout"):
        delta.encode(other, new)


@pytest.mark.parametrize("algorithm", ["xxh3-128", "blake3"])
def test_pieces_and_digest_match_an_independent_hash(tmp_path: Path, algorithm: str) -> None:
    import xxhash

    def independent(b: bytes) -> str:
        return (
            blake3.blake3(b).hexdigest() if algorithm == "blake3" else xxhash.xxh3_128_hexdigest(b)
        )

    data = os.urandom(2 * 4096 + 100)
    (tmp_path / "m.safetensors").write_bytes(data)
    entry = hash_file(tmp_path / "m.safetensors", chunk_bytes=4096, algorithm=algorithm)
    expected = [independent(data[i : i + 4096]) for i in range(0, len(data), 4096)]
    assert list(entry.pieces) == expected and entry.size == len(data)
    assert entry.digest == f"{algorithm}:" + independent(
        b"".join(bytes.fromhex(p) for p in expected)
    )
    assert entry.algorithm == algorithm


class Server:
    """An aiohttp weight server on a free port in a background thread's loop."""

    def __init__(self, store: WeightStore, slots: int = 0, handler: object = None) -> None:
        self.store = store
        self.counters = ServeCounters()
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        if handler is not None:
            app.router.add_get("/weights/{version}/{name}", handler)  # type: ignore[arg-type]
        else:
            add_routes(app, store, slots=slots, counters=self.counters)
        import threading

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner, self.port = asyncio.run_coroutine_threadsafe(
            start(app, "127.0.0.1", 0), self.loop
        ).result()

    def url(self, version: int) -> str:
        return f"http://127.0.0.1:{self.port}/weights/{version}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture(params=["xxh3-128", "blake3"])
def published(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[WeightStore, Server, list[bytes]]]:
    """Two versions published with each piece digest (every transfer test runs with both)."""
    store = WeightStore(
        tmp_path / "learner",
        keep=5,
        full_every=100,
        delta_max_ratio=0.9,
        chunk_bytes=256 << 10,
        digest=request.param,
    )
    files = [safetensors_bytes(weights(0)), safetensors_bytes(weights(1, step=1e-3))]
    for v, blob in enumerate(files, start=1):
        store.publish(v, lambda d, blob=blob: (d / "model.safetensors").write_bytes(blob))  # type: ignore[misc]
    server = Server(store)
    yield store, server, files
    server.close()


def fetch(
    store: WeightStore, sources: Sources, version: int, dest: Path, **kw: object
) -> tuple[Manifest, Path, FetchStats]:
    sha = sha256_bytes(store.manifest_bytes(version))
    return fetch_version(sources, sha, dest, allow_link=False, **kw)  # type: ignore[arg-type]


def test_full_download_verifies_and_lands_whole(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    store, server, files = published
    manifest, path, stats = fetch(store, Sources(server.url(1)), 1, tmp_path / "s", parallel=3)
    assert (path / "model.safetensors").read_bytes() == files[0]
    assert stats.method == "full" and stats.bytes_received == len(files[0])
    assert manifest.delta is None  # the first version has nothing to be a delta of
    # a corrupted piece on the only source: refused, nothing left behind
    broken = store.path(1) / "model.safetensors"
    raw = bytearray(broken.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    broken.write_bytes(bytes(raw))
    with pytest.raises(WeightVerificationError, match="no source left"):
        fetch(store, Sources(server.url(1)), 1, tmp_path / "t")
    assert not (tmp_path / "t" / "v1").exists()


def test_a_corrupt_peer_and_a_dying_peer_cost_only_their_pieces(
    tmp_path: Path,
    published,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small pieces from three sources: a peer serving flipped bytes and a peer that hangs up
    mid-piece are tried first (peers before the learner); their pieces come from the learner
    instead and the file is exact."""
    store, server, files = published
    monkeypatch.setattr("pipeline.weights.transfer.BUFFER_BYTES", 4096)
    corrupt = WeightStore(tmp_path / "corrupt")
    shutil.copytree(store.path(1), corrupt.path(1))
    blob = bytearray((corrupt.path(1) / "model.safetensors").read_bytes())
    for i in range(100, len(blob), 50_000):
        blob[i] ^= 0x01
    (corrupt.path(1) / "model.safetensors").write_bytes(bytes(blob))
    bad = Server(corrupt)

    async def hang_up(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=206, headers={"Content-Length": str(10**6)})
        await resp.prepare(request)
        await resp.write(b"\0" * 1000)
        request.transport.close()  # type: ignore[union-attr]
        return resp

    dying = Server(corrupt, handler=hang_up)
    try:
        assert len(Manifest.from_bytes(store.manifest_bytes(1)).files[0].pieces) > 4
        sources = Sources(server.url(1), lambda: [bad.url(1), dying.url(1)])
        _, path, stats = fetch(store, sources, 1, tmp_path / "s", parallel=2)
        assert (path / "model.safetensors").read_bytes() == files[0]
        assert stats.failed_pieces >= 2
        assert stats.bytes_by_source.get(server.url(1)) == len(files[0])
    finally:
        bad.close()
        dying.close()


def test_a_busy_source_is_shared_in_turn(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    """One slot, four receivers at once: all succeed, some were told to wait (503)."""
    store, _, files = published
    busy = Server(store, slots=1)

    def one(i: int) -> FetchStats:
        _, path, stats = fetch(store, Sources(busy.url(2)), 2, tmp_path / f"r{i}", parallel=2)
        assert (path / "model.safetensors").read_bytes() == files[1]
        return stats

    async def main() -> list[FetchStats]:
        return list(await asyncio.gather(*(asyncio.to_thread(one, i) for i in range(4))))

    try:
        stats = asyncio.run(main())
    finally:
        busy.close()
    assert sum(s.busy_answers for s in stats) > 0 and busy.counters.busy > 0


def test_a_receiver_at_the_previous_version_takes_the_delta(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    store, server, files = published
    manifest = Manifest.from_bytes(store.manifest_bytes(2))
    assert manifest.delta is not None and manifest.delta.base == 1
    patch = manifest.delta.files[0]
    assert patch.name == delta_name(1, "model.safetensors") and patch.size < len(files[1])
    _, held, _ = fetch(store, Sources(server.url(1)), 1, tmp_path / "s")
    _, path, stats = fetch(store, Sources(server.url(2)), 2, tmp_path / "s", local={1: held})
    assert stats.method == "delta" and stats.bytes_received == patch.size
    assert (path / "model.safetensors").read_bytes() == files[1]  # bit for bit
    assert not (path / patch.name).exists()
    # more than one version behind (no base held): the full files
    _, path, stats = fetch(store, Sources(server.url(2)), 2, tmp_path / "t", local={})
    assert stats.method == "full" and (path / "model.safetensors").read_bytes() == files[1]
    # a base that is not what the delta expects: the rebuilt file does not verify -> full
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes(safetensors_bytes(weights(5, step=0.1)))
    _, path, stats = fetch(store, Sources(server.url(2)), 2, tmp_path / "u", local={1: wrong})
    assert stats.method == "full" and (path / "model.safetensors").read_bytes() == files[1]
    # every tenth version is full only
    store.full_every = 3
    store.publish(3, lambda d: (d / "model.safetensors").write_bytes(files[0]))
    assert Manifest.from_bytes(store.manifest_bytes(3)).delta is None
    store.publish(4, lambda d: (d / "model.safetensors").write_bytes(files[1]))
    assert Manifest.from_bytes(store.manifest_bytes(4)).delta is not None


def test_a_sampler_on_the_learners_machine_links_the_files(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    store, server, files = published
    sha = sha256_bytes(store.manifest_bytes(1))
    _, path, stats = fetch_version(Sources(server.url(1)), sha, tmp_path / "s")
    assert stats.method == "link" and stats.bytes_received == 0
    a, b = path / "model.safetensors", store.path(1) / "model.safetensors"
    assert a.stat().st_ino == b.stat().st_ino
    shutil.rmtree(store.path(1))  # the learner drops the version: the sampler's copy stays
    assert a.read_bytes() == files[0]


def test_pieces_are_the_manifest_chunk_size() -> None:
    assert CHUNK_BYTES >= 1 << 20


@pytest.mark.slow
def test_announcements_are_followed_over_pub_sub(redis_server: RedisServer) -> None:
    """A subscriber sees a published announcement at once, and None when nothing comes."""
    from tests.helpers import make_streams

    async def main() -> list[bytes | None]:
        s = make_streams(redis_server)
        got: list[bytes | None] = []

        async def listen() -> None:
            async for message in s.weight_announcements(0.2):
                got.append(message)
                if message is not None:
                    return

        task = asyncio.ensure_future(listen())
        await asyncio.sleep(0.5)
        await s.announce_weights(b"hello")
        await asyncio.wait_for(task, 5)
        await s.advertise_weights("w1", 4, "http://a/weights/4")
        await s.advertise_weights("w2", 3, "http://b/weights/3")
        assert await s.weight_sources(4) == ["http://a/weights/4"]
        await s.withdraw_weights("w1")
        assert await s.weight_sources(4) == []
        await s.close()
        return got

    got = asyncio.run(main())
    assert got[-1] == b"hello" and None in got[:-1]


def bare_follower(streams: object, engine: object, metrics: object, work_dir: Path) -> Any:
    """A follower with no token, relay or trusted URL, over a stand-in engine (what is under
    test is the follower's own bookkeeping, not a swap)."""
    from workers.follow import WeightFollower

    return WeightFollower(
        streams,  # type: ignore[arg-type]
        engine,  # type: ignore[arg-type]
        metrics,  # type: ignore[arg-type]
        work_dir,
        {},
        token=None,
        trusted_url="",
        download_timeout_s=5.0,
        max_staleness=1,
        unhealthy_after_s=60.0,
    )


def test_the_key_is_read_as_soon_as_the_weights_channel_is_subscribed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """An announcement made before a subscription (while Redis was away and came back) is only
    in the key: the follower reads it as soon as it is subscribed, not ``weights_poll_s`` later
    (a sampler left on old weights that long makes every tree it sends stale)."""
    from tests.helpers import make_streams
    from workers.metrics import SamplerMetrics

    class Engine:
        policy_version = 0

        def staged(self) -> None:
            return None

        async def apply_staged(self) -> None:
            return None

    async def main() -> tuple[list[float], float]:
        s = make_streams(redis_server)
        follower = bare_follower(s, Engine(), SamplerMetrics(), tmp_path)
        polls: list[float] = []

        async def poll() -> None:
            polls.append(time.monotonic())

        follower.poll = poll  # type: ignore[method-assign]
        stop = asyncio.Event()
        started = time.monotonic()
        task = asyncio.ensure_future(follower.follow(stop, poll_s=60.0))
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.wait_for(task, 5)
        await s.close()
        return polls, started

    polls, started = asyncio.run(main())
    assert polls, "the key was not read after subscribing"
    assert polls[0] - started < 1.0


def test_a_failed_download_is_a_warning_until_it_keeps_failing(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A download that fails once (the learner exiting right after announcing its last version)
    is routine and logged as a warning; the third failure in a row of the same version is an
    error, and a failed verification is an error the first time (someone served wrong bytes)."""
    from pipeline.wire.messages import WeightAnnouncement
    from tests.helpers import make_streams
    from workers.follow import LOUD_AFTER_ATTEMPTS
    from workers.metrics import SamplerMetrics

    class Engine:
        policy_version = 4

    metrics = SamplerMetrics()
    follower = bare_follower(make_streams(redis_server), Engine(), metrics, tmp_path)
    ann = WeightAnnouncement(5, "http://127.0.0.1:9/weights/5", "0" * 64, 1)
    levels = []
    with caplog.at_level(logging.WARNING, logger="workers.follow"):
        for _ in range(LOUD_AFTER_ATTEMPTS):
            caplog.clear()
            follower._failed(ann, ConnectionRefusedError(111, "Connection refused"))
            levels.append(caplog.records[-1].levelno)
        caplog.clear()
        follower._failed(
            WeightAnnouncement(6, ann.url, "1" * 64, 1),
            WeightVerificationError("piece 0: sha256 mismatch"),
        )
        verification = caplog.records[-1]
    assert levels == [logging.WARNING] * (LOUD_AFTER_ATTEMPTS - 1) + [logging.ERROR]
    assert verification.levelno == logging.ERROR and "verification" in verification.getMessage()
    assert follower.failing[5].attempts == LOUD_AFTER_ATTEMPTS
    assert metrics.weight_failures.labels("download")._value.get() == LOUD_AFTER_ATTEMPTS


def test_an_old_version_is_overwritten_in_place_but_never_the_learners(
    tmp_path: Path,
    published,  # type: ignore[no-untyped-def]
) -> None:
    """A download reuses the oldest held version's file (same inode, new bytes), unless that
    file is a hard link to the learner's store."""
    store, server, files = published
    sha1, sha2 = (sha256_bytes(store.manifest_bytes(v)) for v in (1, 2))
    _, own, _ = fetch_version(Sources(server.url(1)), sha1, tmp_path / "own", allow_link=False)
    inode = (own / "model.safetensors").stat().st_ino
    _, new, stats = fetch_version(
        Sources(server.url(2)), sha2, tmp_path / "own", allow_link=False, recycle=own
    )
    assert stats.method == "full" and (new / "model.safetensors").stat().st_ino == inode
    assert (new / "model.safetensors").read_bytes() == files[1]
    assert not (own / "manifest.json").exists()  # the old version is no longer offered
    _, linked, stats = fetch_version(Sources(server.url(1)), sha1, tmp_path / "linked")
    assert stats.method == "link"
    fetch_version(
        Sources(server.url(2)), sha2, tmp_path / "linked", allow_link=False, recycle=linked
    )
    assert (store.path(1) / "model.safetensors").read_bytes() == files[0]


def test_a_sampler_links_the_verified_copy_of_another_sampler_on_its_machine(
    tmp_path: Path,
    published,  # type: ignore[no-untyped-def]
) -> None:
    """A copy whose manifest is the announced one is linked (no bytes move); a copy of another
    version, or one that vanished, is passed over for a download; a recycled file never
    overwrites what a peer linked."""
    store, server, files = published
    sha1, sha2 = (sha256_bytes(store.manifest_bytes(v)) for v in (1, 2))
    _, a, _ = fetch_version(Sources(server.url(1)), sha1, tmp_path / "a", allow_link=False)
    _, b, stats = fetch_version(
        Sources(server.url(1)), sha1, tmp_path / "b", allow_link=False, host_copies=[a]
    )
    assert stats.method == "host" and stats.bytes_received == 0
    assert (b / "model.safetensors").stat().st_ino == (a / "model.safetensors").stat().st_ino
    # a copy of version 1 offered for version 2, and a directory that is gone: downloaded
    _, c, stats = fetch_version(
        Sources(server.url(2)),
        sha2,
        tmp_path / "c",
        allow_link=False,
        host_copies=[tmp_path / "gone", a],
    )
    assert stats.method == "full" and (c / "model.safetensors").read_bytes() == files[1]
    # sampler a recycles its version-1 file for version 2: b linked it, so a writes a new file
    _, a2, _ = fetch_version(
        Sources(server.url(2)), sha2, tmp_path / "a", allow_link=False, recycle=a
    )
    assert (b / "model.safetensors").read_bytes() == files[0]
    assert (a2 / "model.safetensors").read_bytes() == files[1]


def test_a_file_a_peer_links_during_the_recycling_move_is_not_overwritten(
    tmp_path: Path,
    published,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer links the old file after the link count was read but before it moved: the
    count read after the move catches it and the download goes to a new file."""
    store, server, files = published
    sha1, sha2 = (sha256_bytes(store.manifest_bytes(v)) for v in (1, 2))
    _, own, _ = fetch_version(Sources(server.url(1)), sha1, tmp_path / "own", allow_link=False)
    peer = tmp_path / "peer.safetensors"
    replace = os.replace

    def linked_first(src: str | Path, dst: str | Path) -> None:
        if Path(src) == own / "model.safetensors" and not peer.exists():
            os.link(src, peer)  # the peer's link lands between the check and the move
        replace(src, dst)

    monkeypatch.setattr("pipeline.weights.transfer.os.replace", linked_first)
    _, new, _ = fetch_version(
        Sources(server.url(2)), sha2, tmp_path / "own", allow_link=False, recycle=own
    )
    assert peer.read_bytes() == files[0]
    assert (new / "model.safetensors").read_bytes() == files[1]
    assert (new / "model.safetensors").stat().st_ino != peer.stat().st_ino


@pytest.mark.slow
def test_samplers_of_one_machine_fetch_a_version_once(
    tmp_path: Path,
    published,  # type: ignore[no-untyped-def]
    redis_server: RedisServer,
) -> None:
    """Four receivers of one machine at once: one takes the lease and downloads, the other
    three wait and link its copy; the learner sends the version once. A lease holder that
    dies (never renews, never releases) holds the others back only until its lease lapses, one
    whose fetch fails gives it back at once, and without Redis a sampler fetches on its own."""
    from pipeline.weights.hostshare import HostShare, shared_fetch
    from tests.helpers import make_streams

    store, server, files = published
    sha = sha256_bytes(store.manifest_bytes(2))

    async def receive(share: HostShare, dest: Path) -> FetchStats:
        async with shared_fetch(share, 2, timeout_s=30) as copies:
            _, path, stats = await asyncio.to_thread(
                fetch_version,
                Sources(server.url(2)),
                sha,
                dest,
                allow_link=False,
                host_copies=copies,
            )
            await share.streams.advertise_weights(
                share.worker_id, 2, "", machine=share.machine, directory=str(path)
            )
        assert (path / "model.safetensors").read_bytes() == files[1]
        return stats

    async def main() -> tuple[list[FetchStats], float, FetchStats]:
        s = make_streams(redis_server)
        shares = [HostShare(s, f"w{i}", machine="node-1", lease_s=0.6) for i in range(4)]
        stats = list(await asyncio.gather(*(receive(h, tmp_path / h.worker_id) for h in shares)))
        # a holder that died: its lease on node-2 lapses, then the waiter fetches itself
        assert await s.claim_weight_fetch("node-2", 2, "dead", ttl_s=0.6)
        waiter = HostShare(s, "late", machine="node-2", lease_s=0.6)
        started = asyncio.get_running_loop().time()
        late = await receive(waiter, tmp_path / "late")
        waited = asyncio.get_running_loop().time() - started
        # a holder whose fetch fails gives the lease back at once: the next one takes it
        failing = HostShare(s, "failing", machine="node-3", lease_s=30)
        assert await failing.wait_or_claim(2, timeout_s=5) == []
        with contextlib.suppress(RuntimeError):
            async with failing.fetching(2):
                raise RuntimeError("download failed")
        await asyncio.sleep(0.01)  # a lease given back lapses within a millisecond
        assert await s.claim_weight_fetch("node-3", 2, "next", ttl_s=30)
        # Redis out of reach: the sampler fetches on its own instead of waiting
        from pipeline.config import RedisSettings, RunSettings, StreamSettings
        from pipeline.wire.streams import Streams
        from tests.services import free_port

        away = Streams(
            RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", retry_attempts=1),
            RunSettings(name="test"),
            StreamSettings(),
        )
        assert await HostShare(away, "alone", machine="node-4").wait_or_claim(2, 5) == []
        await away.close()
        await s.close()
        return stats, waited, late

    sent = server.counters.bytes_sent
    stats, waited, late = asyncio.run(main())
    assert sorted(s.method for s in stats) == ["full", "host", "host", "host"]
    assert sum(s.bytes_received for s in stats) == len(files[1])
    for _ in range(100):  # the server counts a response once it has ended on its side
        if server.counters.bytes_sent - sent >= 2 * len(files[1]):
            break
        time.sleep(0.02)
    assert server.counters.bytes_sent - sent == 2 * len(files[1])  # node-1 once, node-2 once
    assert late.method == "full" and 0.3 < waited < 10
