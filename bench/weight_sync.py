"""Weight sync: publish -> every sampler swapped, against a raw loopback copy of the same bytes.

Two measurements, each with 1 and 4 receivers:

* ``toy``: the toy model's weights through the real path: ``WeightStore.publish`` (write +
  manifest hashes), ``announce`` on Redis, real ``treepo-sampler`` processes (vLLM engines) that
  poll the announcement, download, verify (sizes, sha256, tensor names/shapes), stage, and
  reload the engine. Timed from the announcement until every sampler's /healthz reports the new
  policy version.
* ``synthetic``: a ~1 GB safetensors weight set (``--gigabytes``) fetched with the samplers' own
  ``download_version`` (HTTP from the learner's aiohttp weight server, streaming sha256, staged
  directory) by separate receiver processes started beforehand. No engine reload: no model of
  this size fits a useful CPU benchmark here, so this part measures transfer + verification.

The raw baseline sends the same bytes over a plain loopback TCP socket (``socket.sendfile``) to
the same number of receiver processes that discard them.

    python -m bench.weight_sync [--quick] [--model DIR]
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import ROOT, add_model_option, parser, ratio, toy_model, write_result

# -- receivers (run as child processes) ---------------------------------------------------------


def _receiver(argv: list[str]) -> int:
    """``--receive http URL SHA DEST`` or ``--receive raw PORT BYTES``: wait for a line on stdin,
    receive, print the seconds."""
    kind = argv[0]
    sys.stdin.readline()
    started = time.perf_counter()
    if kind == "http":
        from pipeline.weights import download_version

        url, sha, dest = argv[1], argv[2], Path(argv[3])
        asyncio.run(download_version(url, sha, dest))
    else:
        port, total = int(argv[1]), int(argv[2])
        got = 0
        buf = bytearray(1 << 20)
        with socket.create_connection(("127.0.0.1", port)) as s:
            while got < total:
                n = s.recv_into(buf)
                if not n:
                    break
                got += n
        if got != total:
            raise SystemExit(f"raw receiver got {got} of {total} bytes")
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
    return 0


async def _run_receivers(commands: list[list[str]]) -> float:
    """Start receivers, let them import, release them together; seconds until the last is done."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.weight_sync",
            "--receive",
            *cmd,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for cmd in commands
    ]
    await asyncio.sleep(2.0)  # interpreter start and imports are not part of the transfer
    started = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    for p in procs:
        assert p.stdout is not None
        line = await p.stdout.readline()
        if await p.wait() != 0 or not line:
            raise RuntimeError(f"receiver {p.pid} failed")
    return time.perf_counter() - started


def _raw_server(path: Path, receivers: int) -> tuple[int, threading.Thread]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(receivers)
    port = srv.getsockname()[1]

    def serve() -> None:
        def one(conn: socket.socket) -> None:
            with conn, path.open("rb") as f:
                conn.sendfile(f)

        threads = []
        for _ in range(receivers):
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


async def raw_copy(files: list[Path], receivers: int) -> float:
    """Seconds to send the bytes of ``files`` to ``receivers`` processes over loopback TCP."""
    blob = files[0] if len(files) == 1 else _concat(files)
    port, thread = _raw_server(blob, receivers)
    seconds = await _run_receivers([["raw", str(port), str(blob.stat().st_size)]] * receivers)
    thread.join(timeout=30)
    return seconds


def _concat(files: list[Path]) -> Path:
    out = files[0].parent.parent / "raw-concat.bin"
    with out.open("wb") as f:
        for p in files:
            with p.open("rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    return out


# -- the weight server ----------------------------------------------------------------------------


class Publisher:
    """The learner's side: a WeightStore served by the same aiohttp routes as the learner."""

    def __init__(self, root: Path) -> None:
        from learner.weight_server import WeightStore

        self.store = WeightStore(root, keep=2)
        self.url = ""
        self.runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        from learner.weight_server import add_routes
        from pipeline.httpserver import start

        app = web.Application()
        add_routes(app, self.store)
        self.runner, port = await start(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}"

    def publish(self, version: int, sources: list[Path]) -> tuple[float, bytes, int]:
        started = time.perf_counter()

        def write(d: Path) -> None:
            for s in sources:
                shutil.copy(s, d / s.name)

        manifest, data = self.store.publish(version, write)
        return time.perf_counter() - started, data, sum(f.size for f in manifest.files)


def sync_row(
    weights: str, n: int, repeat: int, total: int, publish_s: float, sync_s: float, raw_s: float
) -> dict[str, Any]:
    """One measurement: ``n`` receivers of ``total`` bytes each."""
    return {
        "weights": weights,
        "receivers": n,
        "repeat": repeat,
        "bytes": total,
        "publish_seconds": publish_s,
        "sync_seconds": sync_s,
        "raw_copy_seconds": raw_s,
        "sync_gb_per_second": n * total / 1e9 / sync_s,
        "raw_gb_per_second": n * total / 1e9 / raw_s,
    }


def synthetic_weights(out: Path, gigabytes: float) -> list[Path]:
    """Safetensors files totalling ``gigabytes`` (float32 tensors of 64M elements at most)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    total = int(gigabytes * 1e9) // 4
    files, i = [], 0
    while total > 0:
        n = min(total, 64 * 2**20)
        path = out / f"model-{i:05d}.safetensors"
        save_file({f"layer{i}.weight": torch.randn(n // 1024, 1024)}, str(path))
        files.append(path)
        total -= n
        i += 1
    return files


async def synthetic(
    work: Path, gigabytes: float, counts: list[int], repeats: int
) -> list[dict[str, Any]]:
    from pipeline.weights import sha256_bytes

    files = synthetic_weights(work / "src", gigabytes)
    pub = Publisher(work / "store")
    await pub.start()
    rows = []
    version = 0
    try:
        for n in counts:
            for r in range(repeats):
                version += 1
                publish_s, data, total = pub.publish(version, files)
                sha = sha256_bytes(data)
                dests = [work / f"recv{version}-{i}" for i in range(n)]
                sync_s = await _run_receivers(
                    [["http", f"{pub.url}/weights/{version}", sha, str(d)] for d in dests]
                )
                raw_s = await raw_copy(files, n)
                for d in dests:
                    shutil.rmtree(d, ignore_errors=True)
                row = sync_row("synthetic", n, r, total, publish_s, sync_s, raw_s)
                print(row, flush=True)
                rows.append(row)
    finally:
        await pub.runner.cleanup()
    return rows


# -- real samplers --------------------------------------------------------------------------------


def _wait_started(proc: subprocess.Popen[bytes], port: int, timeout: float = 600) -> None:
    from tests.services import wait_port

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"sampler exited with {proc.returncode} before serving (see its log)"
            )
        try:
            wait_port(port, timeout=1.0)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"sampler on port {port} not up after {timeout}s")


def _health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
        return dict(json.loads(r.read()))


async def toy(work: Path, model: Path, counts: list[int], repeats: int) -> list[dict[str, Any]]:
    from learner.weight_server import announce
    from pipeline.config import RedisSettings, RunSettings, StreamSettings
    from pipeline.streams import Streams
    from tests.services import RedisServer, free_port

    redis = RedisServer(work / "redis", free_port()).start()
    pub = Publisher(work / "store")
    await pub.start()
    streams = Streams(RedisSettings(url=redis.url), RunSettings(name="bench"), StreamSettings())
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    rows = []
    version = 0
    sources = [model / "model.safetensors"]
    try:
        for n in counts:
            while len(procs) < n:
                port = free_port()
                env = {
                    **os.environ,
                    "TREEPO_REDIS__URL": redis.url,
                    "TREEPO_RUN__NAME": "bench",
                    "TREEPO_SAMPLER__MODEL": str(model),
                    "TREEPO_SAMPLER__WORK_DIR": str(work / f"sampler{len(procs)}"),
                    "TREEPO_SAMPLER__WEIGHTS_POLL_S": "0.05",
                    "TREEPO_STREAMS__BLOCK_MS": "50",
                    "TREEPO_RUN__MAX_STALENESS": "64",
                }
                log = (work / f"sampler{len(procs)}.log").open("wb")
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "workers.sampler", "--port", str(port)],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        cwd=ROOT,
                    )
                )
                ports.append(port)
            for proc, port in zip(procs, ports):
                await asyncio.to_thread(_wait_started, proc, port)
            for r in range(repeats):
                version += 1
                publish_s, data, total = pub.publish(version, sources)
                started = time.perf_counter()
                await announce(streams, version, pub.url, data, total)
                pending = set(ports)
                while pending:
                    for port in list(pending):
                        if _health(port)["policy_version"] >= version:
                            pending.discard(port)
                    await asyncio.sleep(0.01)
                sync_s = time.perf_counter() - started
                raw_s = await raw_copy(sources, n)
                row = sync_row("toy", n, r, total, publish_s, sync_s, raw_s)
                row["poll_interval_s"] = 0.05
                print(row, flush=True)
                rows.append(row)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        await streams.close()
        await pub.runner.cleanup()
        redis.kill()
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["weights"], r["receivers"]), []).append(r)
    out = []
    for (weights, n), rs in groups.items():
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in rs[0]
            if k.endswith(("seconds", "per_second"))
        }
        out.append(
            {
                "weights": weights,
                "receivers": n,
                "bytes": rs[0]["bytes"],
                **med,
                "sync_vs_raw_ratio": ratio(med["raw_copy_seconds"], med["sync_seconds"]),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--receive":
        return _receiver(sys.argv[2:])
    p = parser(__doc__.split("\n")[0])
    add_model_option(p)
    p.add_argument("--gigabytes", type=float, default=None, help="synthetic size (1.0; 0.01 quick)")
    p.add_argument("--repeats", type=int, default=None, help="repeats (3; 1 quick)")
    args = p.parse_args(argv)
    gigabytes = args.gigabytes or (0.01 if args.quick else 1.0)
    repeats = args.repeats or (1 if args.quick else 3)
    counts = [1, 2] if args.quick else [1, 4]
    args.model = toy_model(args)
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        work = Path(tmp)
        rows = asyncio.run(synthetic(work / "synthetic", gigabytes, counts, repeats))
        rows += asyncio.run(toy(work / "toy", args.model, [1] if args.quick else counts, repeats))
    result = {
        "synthetic_gigabytes": gigabytes,
        "summary": summarize(rows),
        "rows": rows,
        "note": "sync = announcement (toy) or release (synthetic) until every receiver has verified "
        "(and, for toy, swapped); ratio = raw copy seconds / sync seconds",
    }
    write_result("weight_sync", args, result)
    for s in result["summary"]:
        print(
            f"{s['weights']:9s} x{s['receivers']}: {s['bytes'] / 1e6:.1f} MB sync {s['sync_seconds']:.2f}s "
            f"({s['sync_gb_per_second']:.2f} GB/s) vs raw {s['raw_copy_seconds']:.2f}s "
            f"({s['raw_gb_per_second']:.2f} GB/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
