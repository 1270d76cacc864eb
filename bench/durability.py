"""What Redis durability costs: publish rates at ``appendfsync everysec`` (ops/redis.conf) vs
``always``.

Both servers run ``ops/redis.conf`` with only ``appendfsync`` changed, on this machine's disk.
The publisher is the pipeline's own (``Streams.publish``, one XADD awaited at a time, as the
learner admits prompts and a sampler publishes trees), with realistic 256 KB trees and ~100-byte
prompts; the two settings alternate over the repeats so drift hits both alike. The ratio
``always / everysec`` is what fsync on every write costs in throughput (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from typing import Any

from bench.common import ROOT, parser, ratio, write_result
from bench.transport import synthetic_tree
from pipeline.config import RedisSettings, RunSettings, StreamSettings
from pipeline.wire.messages import Message, PromptTask, encode
from pipeline.wire.streams import Streams
from tests.services import free_port, wait_port


async def publish_rate(url: str, messages: list[Message]) -> float:
    """Messages per second through ``Streams.publish`` (sequential, each XADD awaited)."""
    s = Streams(RedisSettings(url=url), RunSettings(name="durability"), StreamSettings())
    started = time.perf_counter()
    for m in messages:
        await s.publish(s.keys.trees, m)
    seconds = time.perf_counter() - started
    await s.client.delete(s.keys.trees)
    await s.close()
    return len(messages) / seconds


def measure(fsync: str, kinds: dict[str, list[Message]]) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as data:
        cmd = ["redis-server", str(ROOT / "ops" / "redis.conf"), "--port", str(port)]
        cmd += ["--dir", data, "--appendfsync", fsync]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            wait_port(port)
            url = f"redis://127.0.0.1:{port}/0"
            return {k: asyncio.run(publish_rate(url, msgs)) for k, msgs in kinds.items()}
        finally:
            server.terminate()
            server.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats (3; 1 quick)")
    args = p.parse_args(argv)
    (ROOT / "runs").mkdir(exist_ok=True)
    n_trees, n_prompts = (10, 50) if args.quick else (200, 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    distinct = [synthetic_tree(i) for i in range(20)]
    kinds: dict[str, list[Message]] = {
        "trees": [distinct[i % 20] for i in range(n_trees)],
        "prompts": [
            PromptTask(f"q{i}", list(range(40)), "53", i, 0, "arith") for i in range(n_prompts)
        ],
    }
    rows: list[dict[str, Any]] = []
    for r in range(repeats):
        for fsync in ("everysec", "always"):
            rates = measure(fsync, kinds)
            rows.append({"repeat": r, "appendfsync": fsync, **rates})
            print(rows[-1], flush=True)
    best = {
        (fsync, k): max(row[k] for row in rows if row["appendfsync"] == fsync)
        for fsync in ("everysec", "always")
        for k in kinds
    }
    result = {
        "trees": n_trees,
        "prompts": n_prompts,
        "tree_bytes": len(encode(distinct[0])),
        "repeats": rows,
        **{f"{k}_per_second_{fsync}": v for (fsync, k), v in best.items()},
        **{
            f"{k}_always_vs_everysec": ratio(best[("always", k)], best[("everysec", k)])
            for k in kinds
        },
        "note": "best of the alternating repeats; ratio = always / everysec throughput",
    }
    write_result("durability", args, result)
    print(
        f"always vs everysec: trees {result['trees_always_vs_everysec']:.2f}x, "
        f"prompts {result['prompts_always_vs_everysec']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
