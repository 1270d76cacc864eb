"""Weight swaps from memory vs from disk, on the real engine (CPU, model in this process).

A swap from disk has vLLM read the version's safetensors files while the engine's loop waits;
a swap from memory reads them first, off the loop (``read_weights``), and the swap only copies
the tensors in. Both swap the same bytes into the same engine, alternating, ``--repeats``
times each. Reported: the seconds the engine's loop waited per swap (median), and the seconds
of reading done beforehand for the memory swaps.

    python -m bench.swap_memory [--quick] [--model DIR]
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, parser, ratio, toy_model, write_result

REAL = ROOT / "runs" / "models" / "smollm2-135m-instruct"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model dir (SmolLM2 when fetched)")
    p.add_argument("--repeats", type=int, default=None, help="swaps per mode (6; 2 quick)")
    args = p.parse_args(argv)
    if args.model is None and REAL.is_dir() and not args.quick:
        args.model = REAL
    model = toy_model(args)
    repeats = args.repeats or (2 if args.quick else 6)
    from workers.engine import EngineOptions, SwapStats, VLLMPathGenerator, read_weights

    work = ROOT / "runs" / "bench" / f"swap-memory-{time.strftime('%Y%m%d-%H%M%S')}"
    version = work / "v1"
    version.mkdir(parents=True)
    for f in model.glob("*.safetensors"):
        shutil.copy(f, version / f.name)
    engine = VLLMPathGenerator(EngineOptions(model=str(model), dtype="float32"))
    swaps: list[SwapStats] = []
    engine.meter.swap_listeners.append(swaps.append)
    rows: dict[str, list[dict[str, float]]] = {"disk": [], "memory": []}
    try:
        for i in range(repeats):
            for mode in ("disk", "memory"):
                started = time.perf_counter()
                tensors = read_weights(version) if mode == "memory" else None
                read_s = time.perf_counter() - started
                engine.stage_weights(i + 1, version, tensors)
                asyncio.run(engine.apply_staged())
                rows[mode].append(
                    {"loop_wait_seconds": swaps[-1].load_seconds, "read_seconds": read_s}
                )
        in_process = engine.in_process
    finally:
        engine.close()
    size = sum(f.stat().st_size for f in version.glob("*.safetensors"))
    summary: dict[str, Any] = {
        mode: {
            "loop_wait_seconds_median": statistics.median(r["loop_wait_seconds"] for r in rs),
            "read_seconds_median": statistics.median(r["read_seconds"] for r in rs),
            "swaps": rs,
        }
        for mode, rs in rows.items()
    }
    result = {
        "model": model.name,
        "weight_bytes": size,
        "repeats": repeats,
        "in_process": in_process,
        "modes": summary,
        "loop_wait_memory_vs_disk": ratio(
            summary["memory"]["loop_wait_seconds_median"],
            summary["disk"]["loop_wait_seconds_median"],
        ),
    }
    write_result("swap_memory", args, result)
    print(
        f"{model.name} ({size / 1e6:.0f} MB): the engine waits "
        f"{summary['disk']['loop_wait_seconds_median'] * 1000:.0f} ms per swap from disk, "
        f"{summary['memory']['loop_wait_seconds_median'] * 1000:.0f} ms from memory "
        f"(x{result['loop_wait_memory_vs_disk']:.2f}; reading beforehand "
        f"{summary['memory']['read_seconds_median'] * 1000:.0f} ms, off the loop)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
