"""Transport: realistic trees through Redis Streams against the raw Redis limit, in one run.

Pipeline path (what samplers and the learner do): ``messages.encode`` + XADD by a producer while a
consumer does XREADGROUP + ``messages.decode`` (validated) + XACK, concurrently, through
``pipeline.wire.streams.Streams``. Raw path: the same bytes, already encoded, through XADD,
XREADGROUP and XACK with a bare redis-py client and no decoding. Both run against one
redis-server started with ``ops/redis.conf`` (append-only file, fsync every second).

Trees are 16 leaves: root fan-out 2, branching 2, 512-token segments, depth 6 (every leaf a
3,072-token response; 62 segments, about 32k tokens and 250 KB a tree).

    python -m bench.transport [--quick]
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import tempfile
import time
from typing import Any

import redis.asyncio as aioredis

from bench.common import ROOT, parser, ratio, write_result
from pipeline.config import RedisSettings, RunSettings, StreamSettings
from pipeline.wire.messages import TreeRollout, encode
from pipeline.wire.streams import Streams
from tests.services import free_port, wait_port


def synthetic_tree(seed: int, segment: int = 512, depth: int = 6, leaves: int = 16) -> TreeRollout:
    """A binary segment tree with ``leaves`` paths of ``depth`` segments, random tokens."""
    rng = random.Random(seed)
    tree = TreeRollout([rng.randrange(32_000) for _ in range(128)], tree_id=f"t-{seed}")
    tree.prompt_id, tree.sampler_id = f"q{seed}", "bench"

    def seg() -> tuple[list[int], list[float]]:
        return [rng.randrange(32_000) for _ in range(segment)], [
            -rng.random() * 3 for _ in range(segment)
        ]

    frontier = [-1]
    for _ in range(depth):
        nxt: list[int] = []
        for parent in frontier:
            fan = 2 if len(frontier) * 2 <= leaves else 1
            for _ in range(fan):
                tokens, lps = seg()
                nxt.append(tree.add_node(parent, tokens, lps, 0))
        frontier = nxt
    for node in frontier:
        tree.add_leaf(node, "eos").reward = float(rng.random() < 0.5)
    tree.recount()
    return tree


async def pipeline_path(url: str, trees: list[TreeRollout]) -> dict[str, float]:
    settings = (
        RedisSettings(url=url),
        RunSettings(name=f"bench-{time.time_ns()}"),
        StreamSettings(block_ms=100, batch=16),
    )
    prod, cons = Streams(*settings), Streams(*settings)
    stream = prod.keys.trees
    await prod.ensure_group(stream, "learner")
    received = 0

    async def produce() -> None:
        for t in trees:
            await prod.publish(stream, t)

    async def consume() -> None:
        nonlocal received
        while received < len(trees):
            batch = await cons.read(stream, "learner", "c0")
            assert all(isinstance(d.message, TreeRollout) for d in batch)
            await cons.ack(stream, "learner", [d.entry_id for d in batch])
            received += len(batch)

    started = time.perf_counter()
    await asyncio.gather(produce(), consume())
    seconds = time.perf_counter() - started
    await prod.client.delete(stream)
    await prod.close()
    await cons.close()
    return {"seconds": seconds}


async def raw_path(url: str, payloads: list[bytes]) -> dict[str, float]:
    prod, cons = aioredis.from_url(url), aioredis.from_url(url)
    stream = f"bench-raw-{time.time_ns()}"
    await prod.xgroup_create(stream, "g", id="0", mkstream=True)
    received = 0

    async def produce() -> None:
        for p in payloads:
            await prod.xadd(stream, {"m": p})

    async def consume() -> None:
        nonlocal received
        while received < len(payloads):
            reply = await cons.xreadgroup("g", "c0", {stream: ">"}, count=16, block=100)
            ids = [eid for _, items in reply or [] for eid, _ in items]
            if ids:
                await cons.xack(stream, "g", *ids)
            received += len(ids)

    started = time.perf_counter()
    await asyncio.gather(produce(), consume())
    seconds = time.perf_counter() - started
    await prod.delete(stream)
    await prod.aclose()
    await cons.aclose()
    return {"seconds": seconds}


def codec_only(trees: list[TreeRollout]) -> dict[str, float]:
    from pipeline.wire.messages import decode

    started = time.perf_counter()
    payloads = [encode(t) for t in trees]
    enc = time.perf_counter() - started
    started = time.perf_counter()
    for p in payloads:
        decode(p)
    dec = time.perf_counter() - started
    return {"encode_seconds": enc, "decode_seconds": dec}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--trees", type=int, default=None, help="trees per path (default 300; 10 quick)")
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats (3; 1 quick)")
    args = p.parse_args(argv)
    n = args.trees or (10 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 3)
    distinct = [synthetic_tree(i) for i in range(min(n, 20))]
    trees = [distinct[i % len(distinct)] for i in range(n)]
    payloads = [encode(t) for t in trees]
    mb = sum(len(x) for x in payloads) / 1e6
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen(
            ["redis-server", str(ROOT / "ops" / "redis.conf"), "--port", str(port), "--dir", data],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_port(port)
            url = f"redis://127.0.0.1:{port}/0"
            rows: list[dict[str, Any]] = []
            for r in range(repeats):  # alternate the paths so drift hits both alike
                pipe = asyncio.run(pipeline_path(url, trees))
                raw = asyncio.run(raw_path(url, payloads))
                rows.append(
                    {
                        "repeat": r,
                        "pipeline_seconds": pipe["seconds"],
                        "raw_seconds": raw["seconds"],
                    }
                )
                print(rows[-1], flush=True)
        finally:
            server.terminate()
            server.wait(timeout=10)
    codec = codec_only(trees)
    pipe_s = min(r["pipeline_seconds"] for r in rows)
    raw_s = min(r["raw_seconds"] for r in rows)
    result = {
        "tree": {
            "leaves": 16,
            "segments": len(trees[0].nodes),
            "tokens": sum(len(x.token_ids) for x in trees[0].nodes),
            "bytes_mean": round(mb * 1e6 / n),
        },
        "trees": n,
        "megabytes": mb,
        "repeats": rows,
        "pipeline_trees_per_second": n / pipe_s,
        "pipeline_megabytes_per_second": mb / pipe_s,
        "raw_trees_per_second": n / raw_s,
        "raw_megabytes_per_second": mb / raw_s,
        "pipeline_vs_raw_ratio": ratio(raw_s, pipe_s),
        "encode_trees_per_second": n / codec["encode_seconds"],
        "decode_trees_per_second": n / codec["decode_seconds"],
        "note": "best of the alternating repeats for each path; ratio = pipeline / raw throughput",
    }
    write_result("transport", args, result)
    print(
        f"pipeline {result['pipeline_trees_per_second']:.0f} trees/s "
        f"({result['pipeline_megabytes_per_second']:.0f} MB/s) vs raw "
        f"{result['raw_trees_per_second']:.0f} trees/s ({result['raw_megabytes_per_second']:.0f} MB/s): "
        f"{result['pipeline_vs_raw_ratio']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
