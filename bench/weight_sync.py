"""Weight sync: publish -> every receiver holds a verified copy, against a raw loopback copy of
the same bytes, side by side in one run.

Parts (``--gigabytes`` of synthetic float32 safetensors, 1 GB by default):

* ``single``: one receiver over HTTP as between machines (same-machine linking off): the
  sampler's own ``fetch_version`` (parallel ranged pieces, xxh3-128 while receiving, ``pwrite``
  in place, header check) from the learner's aiohttp routes (``sendfile``); ``blake3``: the same
  with blake3 pieces (``weights.piece_digest = "blake3"``, the cryptographic option). Publish
  excluded; download + verify + ready to load included. Against a plain TCP ``sendfile`` of the same bytes
  to one process that discards them. The receiver holds an older version whose file it
  overwrites, as a sampler does from its third update on (``cold``: the same into new memory;
  on this virtual machine first-touch pages cost several times the copy). ``link``: the same on
  the learner's machine (hard links).
* ``fanout``: 1, 4 and 8 receivers at once, ``full`` (everyone from the learner, no limit) and
  ``relay`` (the learner answers two receivers at a time; a receiver that verified the version
  advertises it in Redis and serves it to the others), both as between machines, and ``host``:
  the receivers as samplers of one machine (not the learner's) with ``pipeline.weights.hostshare`` on,
  the default: one takes the machine's lease and fetches (relays as in ``relay``), the others
  link its verified copy. Seconds until all hold it, bytes the learner sent. Receivers are
  download-only processes (no vLLM engine: eight engines do not fit this machine next to each
  other); what they run is the samplers' fetch, relay and sharing code.
* ``delta``: one receiver holding version v fetches v+1 published as a delta (bf16 weights, what
  a GPU run publishes; one step of relative size 1e-3; seconds include the rebuild and its
  verification, bytes are the delta's).
* ``codec``: what compresses a real optimizer step best, fp32 and bf16: the toy model trained two
  AdamW steps at the demo's learning rate; what ships (XOR + zstd in a safetensors container)
  against bare XOR + zstd and zstd of the new weights; every encoding decoded and compared bit for
  bit.

Raw baselines: the same bytes over loopback TCP (``socket.sendfile``) to the same number of
processes that discard them, over one connection each and over ``PARALLEL`` (contiguous ranges,
as many connections as the receivers use); the faster of the two counts (one loopback stream
here runs anywhere from 2.3 to 5 GB/s from run to run; rows keep both). Before every timed
window the setup's writes are flushed (``os.sync``): a sampler's old version, which it
overwrites, was received an update earlier, not copied a moment ago.

    python -m bench.weight_sync [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Progress,
    add_model_option,
    parser,
    ratio,
    toy_model,
    write_result,
)

SAMPLER_HOST = "bench-sampler-host"
"""The machine the receivers share in ``host`` mode (not the learner's: they download from it)."""
LEARNER_SLOTS = 2
"""Receivers the learner (and each relay) serves at once in relay mode."""
PARALLEL = 4


# -- receivers (child processes) -----------------------------------------------------------------


def _receiver(argv: list[str]) -> int:
    """``--receive KIND ...``: wait for a line on stdin, receive, print a JSON line, and (relay)
    serve until stdin closes."""
    kind = argv[0]
    if kind == "raw":
        port, total, streams = int(argv[1]), int(argv[2]), int(argv[3])
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        started = time.perf_counter()
        bounds = [total * i // streams for i in range(streams + 1)]
        got = [0] * streams

        def stream(i: int) -> None:  # one connection, one contiguous range, bytes discarded
            buf = bytearray(1 << 20)
            want = bounds[i + 1] - bounds[i]
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(f"{bounds[i]} {bounds[i + 1]}\n".encode())
                while got[i] < want:
                    n = s.recv_into(buf)
                    if not n:
                        break
                    got[i] += n

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if sum(got) != total:
            raise SystemExit(f"raw receiver got {sum(got)} of {total} bytes")
        print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
        return 0
    spec = json.loads(argv[1])
    return asyncio.run(_fetch_receiver(spec))


async def _fetch_receiver(spec: dict[str, Any]) -> int:
    from aiohttp import web

    from pipeline.config import RedisSettings, RunSettings, StreamSettings
    from pipeline.httpserver import start
    from pipeline.weights.hostshare import HostShare, shared_fetch
    from pipeline.weights.server import ServeCounters, WeightStore, add_routes
    from pipeline.weights.transfer import Sources, fetch_version
    from pipeline.wire.streams import Streams

    dest = Path(spec["dest"])
    dest.mkdir(parents=True, exist_ok=True)
    relay = bool(spec.get("redis"))
    streams = (
        Streams(RedisSettings(url=spec["redis"]), RunSettings(name="bench"), StreamSettings())
        if relay
        else None
    )
    counters = ServeCounters()
    runner, url = None, ""
    if relay:
        app = web.Application()
        add_routes(app, WeightStore(dest), slots=LEARNER_SLOTS, counters=counters)
        runner, port = await start(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}/weights/{spec['version']}"
    peers: list[str] = []

    async def refresh() -> None:
        assert streams is not None
        while True:
            found = await streams.weight_sources(spec["version"])
            peers[:] = [u for u in found if u != url]
            await asyncio.sleep(0.05)

    share = (
        HostShare(streams, spec["id"], machine=SAMPLER_HOST)
        if streams is not None and spec.get("share")
        else None
    )
    local = {int(k): Path(v) for k, v in spec.get("local", {}).items()}
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    started = time.perf_counter()
    task = asyncio.ensure_future(refresh()) if relay else None
    try:
        async with shared_fetch(share, spec["version"], 600) as copies:
            _, path, stats = await asyncio.to_thread(
                fetch_version,
                Sources(spec["url"], lambda: list(peers)),
                spec["sha"],
                dest,
                local=local,
                parallel=PARALLEL,
                allow_link=bool(spec.get("link")),
                recycle=Path(spec["recycle"]) if spec.get("recycle") else None,
                host_copies=copies,
            )
            if relay and streams is not None:
                await streams.advertise_weights(
                    spec["id"],
                    spec["version"],
                    url,
                    machine=SAMPLER_HOST if share is not None else "",
                    directory=str(path.resolve()) if share is not None else "",
                )
    finally:
        if task is not None:
            task.cancel()
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "method": stats.method,
                "from_learner": stats.bytes_by_source.get(spec["url"], 0),
                "received": stats.bytes_received,
                "busy": stats.busy_answers,
            }
        ),
        flush=True,
    )
    if relay:  # serve the peers until the parent closes stdin
        await asyncio.to_thread(sys.stdin.read)
        await runner.cleanup()  # type: ignore[union-attr]
        await streams.close()  # type: ignore[union-attr]
    return 0


async def _run_receivers(specs: list[list[str]]) -> tuple[float, list[dict[str, Any]]]:
    """Start receivers, wait until every one has imported and set up, release them together;
    seconds until the last one reported (and every report)."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.weight_sync",
            "--receive",
            *spec,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for spec in specs
    ]
    for p in procs:  # interpreter start, imports and setup are not part of the transfer
        assert p.stdout is not None
        line = await p.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"receiver {p.pid} did not start (exit {await p.wait()})")
    # the setup's writes (a published version, the old versions receivers overwrite, copied a
    # moment ago) reach the disk before the clock starts: a sampler's old version was received
    # an update earlier, and nothing is written back inside the window
    os.sync()
    started = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    reports = []
    for p in procs:
        assert p.stdout is not None
        line = await p.stdout.readline()
        if not line:
            raise RuntimeError(f"receiver {p.pid} failed (exit {await p.wait()})")
        reports.append(json.loads(line))
    seconds = time.perf_counter() - started
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    for p in procs:
        if await p.wait() != 0:
            raise RuntimeError(f"receiver {p.pid} exited with {p.returncode}")
    return seconds, reports


def _raw_server(path: Path, connections: int) -> tuple[int, threading.Thread]:
    """A loopback server that answers each of ``connections`` connections with the byte range
    it asks for (one line, ``start end``), sent with ``sendfile``."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(connections)
    port = srv.getsockname()[1]

    def serve() -> None:
        def one(conn: socket.socket) -> None:
            with conn, path.open("rb") as f, conn.makefile("rb") as lines:
                start, end = map(int, lines.readline().split())
                conn.sendfile(f, start, end - start)

        threads = []
        for _ in range(connections):
            conn, _ = srv.accept()
            t = threading.Thread(target=one, args=(conn,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        srv.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


async def raw_copy(blob: Path, receivers: int, streams: int = 1) -> float:
    """Seconds to send ``blob`` to ``receivers`` processes over loopback TCP, each over
    ``streams`` connections (contiguous ranges, received at once)."""
    port, thread = _raw_server(blob, receivers * streams)
    size = str(blob.stat().st_size)
    seconds, _ = await _run_receivers([["raw", str(port), size, str(streams)]] * receivers)
    thread.join(timeout=60)
    return seconds


async def wire(blob: Path, receivers: int) -> dict[str, float]:
    """The raw baseline: the faster of one connection per receiver and ``PARALLEL`` (what the
    receivers use); a single loopback stream here runs anywhere from 2.3 to 5 GB/s."""
    one = await raw_copy(blob, receivers, 1)
    many = await raw_copy(blob, receivers, PARALLEL)
    return {"seconds": min(one, many), "one_stream": one, "parallel": many}


# -- the learner's side ----------------------------------------------------------------------------


class Publisher:
    """A WeightStore served by the learner's own routes."""

    def __init__(self, root: Path) -> None:
        from pipeline.weights.server import ServeCounters, WeightStore

        self.store = WeightStore(root, keep=4, full_every=0)
        self.counters = ServeCounters()
        self.url = ""
        self.runner: Any = None
        self.app: Any = None

    async def start(self, slots: int) -> None:
        from aiohttp import web

        from pipeline.httpserver import start
        from pipeline.weights.server import add_routes

        self.app = web.Application()
        add_routes(self.app, self.store, slots=slots, counters=self.counters)
        self.runner, port = await start(self.app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}"

    def publish(
        self, version: int, sources: list[Path], delta_every: int = 0
    ) -> tuple[float, bytes]:
        started = time.perf_counter()
        self.store.full_every = delta_every

        def write(d: Path) -> None:
            for s in sources:
                shutil.copy(s, d / s.name)

        _, data = self.store.publish(version, write)
        return time.perf_counter() - started, data


def synthetic_weights(
    out: Path, gigabytes: float, seed: int = 0, scale: float = 0.0, bf16: bool = False
) -> list[Path]:
    """One safetensors file of ``gigabytes`` of float32 (random; ``scale`` > 0: the seed-0
    weights moved by a relative step of that size, like one optimizer step; ``bf16``: stored
    as bfloat16, what a GPU run publishes)."""
    import numpy as np
    from safetensors.numpy import save_file

    if bf16:
        return _bf16_weights(out, gigabytes, seed, scale)

    out.mkdir(parents=True, exist_ok=True)
    n = int(gigabytes * 1e9) // 4 // 1024 * 1024
    rng = np.random.default_rng(0)
    tensors, left, i = {}, n, 0
    while left > 0:
        k = min(left, 32 * 2**20)
        w = rng.standard_normal(k, dtype=np.float32)
        if scale:
            step = np.random.default_rng(seed + i).standard_normal(k, dtype=np.float32)
            w = (w + scale * np.abs(w) * step).astype(np.float32)
        tensors[f"layer{i}.weight"] = w.reshape(-1, 1024)
        left -= k
        i += 1
    path = out / "model.safetensors"
    save_file(tensors, str(path))
    return [path]


def _bf16_weights(out: Path, gigabytes: float, seed: int, scale: float) -> list[Path]:
    """``synthetic_weights`` in bfloat16 (the top 16 bits of the float32 values; written with
    the safetensors format by hand: numpy has no bfloat16)."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    n = int(gigabytes * 1e9) // 2 // 1024 * 1024
    rng = np.random.default_rng(0)
    header, blobs, offset, left, i = {}, [], 0, n, 0
    while left > 0:
        k = min(left, 64 * 2**20)
        w = rng.standard_normal(k, dtype=np.float32)
        if scale:
            step = np.random.default_rng(seed + i).standard_normal(k, dtype=np.float32)
            w = (w + scale * np.abs(w) * step).astype(np.float32)
        raw = (w.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[f"layer{i}.weight"] = {
            "dtype": "BF16",
            "shape": [k // 1024, 1024],
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
        left -= k
        i += 1
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path = out / "model.safetensors"
    with path.open("wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    return [path]


async def run_fetch(
    pub: Publisher,
    version: int,
    data: bytes,
    work: Path,
    n: int,
    *,
    relay: bool,
    redis: str = "",
    share: bool = False,
    link: bool = False,
    local: dict[int, str] | None = None,
    warm: bool = True,
) -> tuple[float, list[dict[str, Any]], int]:
    """``n`` receivers of one version; (seconds until all verified, reports, learner bytes).
    ``warm``: each receiver holds an older version whose files it overwrites (a sampler from
    its third update on); cold receivers write into memory never used before."""
    from pipeline.weights.manifest import sha256_bytes

    before = pub.counters.bytes_sent
    specs = []
    for i in range(n):
        dest = work / f"r{version}-{i}"
        spare = dest / "v0"
        if warm:
            spare.mkdir(parents=True, exist_ok=True)
            for f in pub.store.path(version).glob("*.safetensors"):
                shutil.copyfile(f, spare / f.name)
        spec = {
            "url": f"{pub.url}/weights/{version}",
            "sha": sha256_bytes(data),
            "dest": str(dest),
            "version": version,
            "id": f"r{i}",
            "link": link,
            "redis": redis if relay else "",
            "share": share,
            "local": local or {},
            "recycle": str(spare) if warm else "",
        }
        specs.append(["fetch", json.dumps(spec)])
    seconds, reports = await _run_receivers(specs)
    for i in range(n):
        shutil.rmtree(work / f"r{version}-{i}", ignore_errors=True)
    return seconds, reports, pub.counters.bytes_sent - before


async def synthetic(work: Path, gigabytes: float, repeats: int, quick: bool) -> dict[str, Any]:
    from pipeline.weights.manifest import DIGESTS
    from tests.services import RedisServer, free_port

    files = synthetic_weights(work / "src", gigabytes)
    size = files[0].stat().st_size
    # fsync as ops/redis.conf ships it (everysec): with ``always`` every advertisement and lease
    # waits for the disk, which is busy writing back the gigabytes just received
    redis = RedisServer(work / "redis", free_port(), appendfsync="everysec").start()
    pub = Publisher(work / "store")
    await pub.start(0)
    rows: list[dict[str, Any]] = []
    version = 0
    counts = [1, 2] if quick else [1, 4, 8]
    progress = Progress(repeats, "weight_sync")
    try:
        for r in range(repeats):
            version += 1
            publish_s, data = pub.publish(version, files)
            walls = {n: await wire(files[0], n) for n in counts}
            for mode in ("single", "cold", "link"):
                seconds, reports, egress = await run_fetch(
                    pub,
                    version,
                    data,
                    work,
                    1,
                    relay=False,
                    link=mode == "link",
                    warm=mode != "cold",
                )
                rows.append(_row(mode, 1, r, size, seconds, walls[1], egress, reports, publish_s))
            for n in counts:
                for mode in ("full", "relay", "host"):
                    if mode != "full" and n == 1:
                        continue
                    pub.counters.busy = 0
                    await _set_slots(pub, LEARNER_SLOTS if mode != "full" else 0)
                    await _clear_sources(redis.url)
                    seconds, reports, egress = await run_fetch(
                        pub,
                        version,
                        data,
                        work,
                        n,
                        relay=mode != "full",
                        redis=redis.url,
                        share=mode == "host",
                    )
                    await _set_slots(pub, 0)
                    rows.append(
                        _row(mode, n, r, size, seconds, walls[n], egress, reports, publish_s)
                    )
            # delta: a receiver holds a bf16 version; the next one (one step of relative size
            # 1e-3) is published as a delta against it
            base = synthetic_weights(work / "bf16base", gigabytes, bf16=True)
            version += 1
            pub.publish(version, base)
            held = work / "held"
            shutil.rmtree(held, ignore_errors=True)
            shutil.copytree(pub.store.path(version), held / f"v{version}")
            version += 1
            step = synthetic_weights(
                work / f"step{version}", gigabytes, seed=version, scale=1e-3, bf16=True
            )
            publish_s, data = pub.publish(version, step, delta_every=1_000_000)
            seconds, reports, egress = await run_fetch(
                pub,
                version,
                data,
                work,
                1,
                relay=False,
                local={version - 1: str(held / f"v{version - 1}")},
            )
            rows.append(_row("delta", 1, r, size, seconds, walls[1], egress, reports, publish_s))
            shutil.rmtree(work / f"step{version}", ignore_errors=True)
            # ``single`` with blake3 piece digests (the cryptographic option): what hashing costs
            version += 1
            pub.store.digest = "blake3"
            publish_s, data = pub.publish(version, files)
            pub.store.digest = DIGESTS[0]
            seconds, reports, egress = await run_fetch(pub, version, data, work, 1, relay=False)
            rows.append(_row("blake3", 1, r, size, seconds, walls[1], egress, reports, publish_s))
            for row in rows[-(len(counts) * 3 + 3) :]:
                print(_brief(row), flush=True)
            progress.step(f"repeat {r + 1}")
    finally:
        await pub.runner.cleanup()
        redis.kill()
    return {"rows": rows, "summary": _summary(rows)}


async def _set_slots(pub: Publisher, slots: int) -> None:
    """Change the learner server's slot limit between measurements (rebuilds its routes)."""
    from aiohttp import web

    from pipeline.httpserver import start
    from pipeline.weights.server import add_routes

    await pub.runner.cleanup()
    port = int(pub.url.rsplit(":", 1)[1])
    pub.app = web.Application()
    add_routes(pub.app, pub.store, slots=slots, counters=pub.counters)
    pub.runner, _ = await start(pub.app, "127.0.0.1", port)


async def _clear_sources(redis_url: str) -> None:
    from pipeline.config import RedisSettings, RunSettings, StreamSettings
    from pipeline.wire.streams import Streams

    s = Streams(RedisSettings(url=redis_url), RunSettings(name="bench"), StreamSettings())
    await s.client.delete(s.keys.weight_sources)
    await s.close()


def _row(
    mode: str,
    n: int,
    repeat: int,
    size: int,
    seconds: float,
    raw: dict[str, float],
    egress: int,
    reports: list[dict[str, Any]],
    publish_s: float,
) -> dict[str, Any]:
    return {
        "mode": mode,
        "receivers": n,
        "repeat": repeat,
        "bytes": size,
        "seconds": seconds,
        "raw_copy_seconds": raw["seconds"],
        "raw_one_stream_seconds": raw["one_stream"],
        "raw_parallel_seconds": raw["parallel"],
        "gb_per_second": n * size / 1e9 / seconds,
        "raw_gb_per_second": n * size / 1e9 / raw["seconds"],
        "learner_egress_bytes": egress,
        "egress_vs_size": egress / size,
        "publish_seconds": publish_s,
        "methods": sorted({r["method"] for r in reports}),
        "slowest_receiver_seconds": max(r["seconds"] for r in reports),
    }


def _brief(r: dict[str, Any]) -> str:
    return (
        f"{r['mode']:6s} x{r['receivers']}: {r['seconds']:6.2f}s ({r['gb_per_second']:5.2f} GB/s) "
        f"raw {r['raw_copy_seconds']:5.2f}s ({r['raw_gb_per_second']:5.2f} GB/s) "
        f"learner sent {r['egress_vs_size']:.2f}x"
    )


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["receivers"]), []).append(r)
    out = []
    for (mode, n), rs in groups.items():
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in rs[0]
            if isinstance(rs[0][k], (int, float)) and k not in ("repeat", "receivers")
        }
        out.append(
            {
                "mode": mode,
                "receivers": n,
                **med,
                "vs_raw_ratio": statistics.median(r["raw_copy_seconds"] / r["seconds"] for r in rs),
            }
        )
    return out


# -- what compresses a real step --------------------------------------------------------------------


def codec_study(model: Path) -> dict[str, Any]:
    """Two AdamW steps of the toy model at the demo's learning rate; each encoding of the
    second version against the first, in fp32 and in bf16."""
    import numpy as np
    import torch
    import zstandard
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.treepo.tasks import ArithTask
    from pipeline.weights import delta
    from toy.demo import DEMO_SETTINGS

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model))
    lr = float(DEMO_SETTINGS["TREEPO_LEARNER__LR"])
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    problems = ArithTask().problems("train", 16, seed=1)
    batch = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    versions = []
    for _ in range(3):
        out = m(**batch, labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        versions.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    result: dict[str, Any] = {
        "learning_rate": lr,
        "parameters": sum(p.numel() for p in m.parameters()),
    }
    for dtype in (torch.float32, torch.bfloat16):
        a = save({k: v.to(dtype).contiguous() for k, v in versions[1].items()})
        b = save({k: v.to(dtype).contiguous() for k, v in versions[2].items()})
        x = np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
        z = zstandard.ZstdCompressor(level=3)
        shipped = delta.encode(a, b)
        if delta.apply(a, shipped) != b:
            raise RuntimeError("the delta does not rebuild the file bit for bit")
        result["fp32" if dtype == torch.float32 else "bf16"] = {
            "bytes": len(b),
            "shipped": len(shipped) / len(b),
            "xor_zstd": len(z.compress(x.tobytes())) / len(b),
            "zstd_of_new": len(z.compress(b)) / len(b),
            "unchanged_bytes": float((x == 0).mean()),
            "bit_identical": True,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--receive":
        return _receiver(sys.argv[2:])
    p = parser(__doc__.split("\n")[0])
    add_model_option(p)
    p.add_argument("--gigabytes", type=float, default=None, help="synthetic size (1.0; 0.02 quick)")
    p.add_argument("--repeats", type=int, default=None, help="repeats (3; 1 quick)")
    args = p.parse_args(argv)
    gigabytes = args.gigabytes or (0.02 if args.quick else 1.0)
    repeats = args.repeats or (1 if args.quick else 3)
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        synth = asyncio.run(synthetic(Path(tmp), gigabytes, repeats, args.quick))
    codec = codec_study(toy_model(args))
    by = {(s["mode"], s["receivers"]): s for s in synth["summary"]}
    single = by[("single", 1)]
    widest = max(n for m, n in by if m == "relay")
    relay = by[("relay", widest)]
    result = {
        "synthetic_gigabytes": gigabytes,
        "parallel_pieces": PARALLEL,
        "learner_receivers_at_once_in_relay": LEARNER_SLOTS,
        "single_receiver_vs_raw_ratio": single["vs_raw_ratio"],
        "single_receiver_blake3_vs_raw_ratio": by[("blake3", 1)]["vs_raw_ratio"],
        "same_machine_link_vs_raw_ratio": by[("link", 1)]["vs_raw_ratio"],
        f"fanout{widest}_time_vs_single": ratio(relay["seconds"], single["seconds"]),
        f"fanout{widest}_egress_vs_size": relay["egress_vs_size"],
        f"fanout{widest}_full_time_vs_single": ratio(
            by[("full", widest)]["seconds"], single["seconds"]
        ),
        f"fanout{widest}_same_host_time_vs_single": ratio(
            by[("host", widest)]["seconds"], single["seconds"]
        ),
        f"fanout{widest}_same_host_egress_vs_size": by[("host", widest)]["egress_vs_size"],
        "delta_time_vs_single": ratio(by[("delta", 1)]["seconds"], single["seconds"]),
        "codec": codec,
        **synth,
        "note": "seconds = release until every receiver verified its copy (ready to load); "
        "vs_raw_ratio = raw copy seconds / seconds for the same receivers; raw copy = the faster "
        "of one and parallel_pieces loopback streams per receiver",
    }
    write_result("weight_sync", args, result)
    for s in synth["summary"]:
        print(_brief(s))
    print(
        f"single vs raw {result['single_receiver_vs_raw_ratio']:.2f}; fanout{widest} "
        f"{result[f'fanout{widest}_time_vs_single']:.2f}x the single time, learner sent "
        f"{result[f'fanout{widest}_egress_vs_size']:.2f}x the version; {widest} on one machine "
        f"{result[f'fanout{widest}_same_host_time_vs_single']:.2f}x, learner sent "
        f"{result[f'fanout{widest}_same_host_egress_vs_size']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
