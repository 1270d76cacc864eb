"""The learner on 1 and 2 DeepSpeed ranks at ZeRO stages 0-3: step time and per-rank memory, in
one run on the same batches.

Every configuration is a fresh job under the DeepSpeed launcher (gloo ranks on CPU here) that
loads the random 25M-parameter Qwen2 model of ``bench/tree_vs_independent.py``, takes
``--steps`` learner steps (``learner.trainer.train_on_batch``, the tree-packed path) on the same
batches of trees grown by the real tree sampler with the scripted generator (the
``seg32-d4-div2`` shape of ``bench/learner_packing.py``), and reports per rank:

* step seconds (best of the steps after the first) and trained tokens per second;
* the training state the rank keeps between steps, counted from its tensors: parameters (under
  ZeRO-3 its partition), the optimizer's state and its fp32 master partition (ZeRO 1-3);
* resident memory: before the engine is built, after the steps, and the peak (which holds the
  gradients and activations of a step too).

On this 2-core machine two ranks share the cores, so the 2-rank step time measures the
overhead of data parallelism (collectives, the control channel), not its speed-up.

    python -m bench.learner_ranks [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, parser, ratio, write_result
from learner.ranks import free_port, launcher_command, leave

STAGES = (0, 1, 2, 3)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def held_bytes(engine: Any) -> dict[str, float]:
    """MiB of the training state this rank keeps between steps, counted from its tensors:
    parameters (under ZeRO-3 its partition), the optimizer's state and fp32 master partition.
    Gradients live only from backward to the optimizer step: the peak RSS holds them."""
    from learner.checkpoint import _masters, optimizer_view

    def size(t: Any) -> int:
        return int(t.numel() * t.element_size())

    params = list(engine.module.parameters())
    if engine.zero_stage == 3:
        held = sum(size(p.ds_tensor) for p in params)
        full = sum(int(p.ds_numel) * p.ds_tensor.element_size() for p in params)
    else:
        held = full = sum(size(p) for p in params)
    with optimizer_view(engine) as opt:
        state = sum(size(v) for s in opt.state.values() for v in s.values() if hasattr(v, "numel"))
        masters = sum(size(m) for m in _masters(engine))
    mib = 2**20
    return {
        "params_mib": held / mib,
        "optimizer_mib": (state + masters) / mib,
        "state_mib": (held + state + masters) / mib,
        "full_params_mib": full / mib,
    }


def child(
    model: str, out: str, stage: int, precision: str, steps: int, trees_file: str, n: int
) -> None:
    """One rank of one configuration (run by the launcher)."""
    import torch

    from learner.batch import build_batch
    from learner.ranks import control
    from learner.trainer import build_engine, train_on_batch
    from pipeline.config import LearnerOptions, LossSettings
    from pipeline.wire.messages import TreeRollout, decode_as

    torch.manual_seed(0)
    trees = [
        decode_as(bytes.fromhex(h), TreeRollout) for h in json.loads(Path(trees_file).read_text())
    ]
    batch = build_batch(trees)
    base = _status_mib("VmRSS")
    opts = LearnerOptions(
        model=model,
        lr=1e-5,
        zero_stage=stage,
        precision=precision,  # type: ignore[arg-type]
        zero3_persistence_threshold=0,  # ZeRO-3 partitions every parameter
    )
    engine = build_engine(model, opts)
    ctl = control()
    seconds = []
    for step in range(steps):
        ctl.barrier()
        started = time.perf_counter()
        stats = train_on_batch(engine, batch, opts, LossSettings(), step)
        seconds.append(time.perf_counter() - started)
    record = {
        "rank": ctl.rank,
        "world": ctl.world,
        "stage": stage,
        "precision": precision,
        "step_seconds": min(seconds[1:] or seconds),
        "tokens_per_second": stats.tokens / min(seconds[1:] or seconds),
        "rss_before_engine_mib": base,
        "rss_after_mib": _status_mib("VmRSS"),
        "peak_rss_mib": _status_mib("VmHWM"),
        **held_bytes(engine),
    }
    name = f"{precision}-w{ctl.world}-s{stage}-rank{ctl.rank}.json"
    (Path(out) / name).write_text(json.dumps(record))


def launch(world: int, *args: str) -> None:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher, "the DeepSpeed launcher (pip install deepspeed)"
    cmd = launcher_command(launcher, world, free_port())
    proc = subprocess.run(
        [*cmd, "--module", "bench.learner_ranks", "--child", *args],
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"world {world} {args}: exit {proc.returncode}\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, out, stage, precision, steps, trees, n = sys.argv[2:9]
        child(model, out, int(stage), precision, int(steps), trees, int(n))
        leave(0)
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="learner steps per job (3; 2 quick)")
    p.add_argument(
        "--precisions",
        default=None,
        help="comma-separated (fp32,bf16; quick: fp32); results of other precisions already in "
        "the work folder are kept",
    )
    args = p.parse_args(argv)
    from bench.learner_packing import grow, settings
    from bench.tree_vs_independent import build_compute_model
    from pipeline.wire.messages import encode

    steps = args.steps or (2 if args.quick else 3)
    cache = ROOT / ".cache" / ("bench-compute-quick" if args.quick else "bench-compute")
    model = build_compute_model(cache, args.quick)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    _, shape, cfg, eos_p = [s for s in settings(args.quick) if s[0] == "compute"][
        0 if args.quick else 1
    ]
    trees = grow(cfg, vocab, 2 if args.quick else 4, 0, eos_p)
    work = ROOT / "runs" / ("bench-learner-ranks-quick" if args.quick else "bench-learner-ranks")
    work.mkdir(parents=True, exist_ok=True)
    trees_file = work / "trees.json"
    trees_file.write_text(json.dumps([encode(t).hex() for t in trees]))
    precisions = tuple((args.precisions or ("fp32" if args.quick else "fp32,bf16")).split(","))
    stages = (0, 3) if args.quick else STAGES
    for precision in precisions:
        for old in work.glob(f"{precision}-*.json"):
            old.unlink()
        # bf16 matmuls are slow on CPUs without bf16 units: one step of one tree, for memory
        job_steps, job_trees = (steps, len(trees)) if precision == "fp32" else (1, 1)
        for stage in stages:
            for world in (1, 2):
                job = (model, work, stage, precision, job_steps, trees_file, job_trees)
                launch(world, *map(str, job))
    rows = [json.loads(f.read_text()) for f in sorted(work.glob("*-rank*.json"))]
    precisions = tuple(sorted({r["precision"] for r in rows}))
    result = summarise(rows, precisions)
    result.update(
        {
            "bf16_note": "bf16 jobs: one step of one tree (memory only; CPU bf16 is slow here)",
            "model_parameters": parameters(rows),
            "tree_shape": shape,
            "trees_per_batch": len(trees),
            "steps_per_job": steps,
            "rows": rows,
        }
    )
    write_result("learner_ranks", args, result)
    return 0


def parameters(rows: list[dict[str, Any]]) -> int:
    """The model's parameter count, from a rank's full parameter bytes and their precision."""
    r = rows[0]
    return round(r["full_params_mib"] * 2**20 / (4 if r["precision"] == "fp32" else 2))


def summarise(rows: list[dict[str, Any]], precisions: tuple[str, ...]) -> dict[str, Any]:
    """Headline ratios: ZeRO-3 vs ZeRO-0 state per rank at 2 ranks, and the 2-rank overhead."""

    def pick(precision: str, world: int, stage: int, key: str) -> float:
        vals = [
            r[key]
            for r in rows
            if (r["precision"], r["world"], r["stage"]) == (precision, world, stage)
        ]
        return max(vals) if vals else 0.0

    out: dict[str, Any] = {}
    for precision in precisions:
        s0 = pick(precision, 2, 0, "state_mib")
        s3 = pick(precision, 2, 3, "state_mib")
        r0 = pick(precision, 2, 0, "rss_after_mib") - pick(precision, 2, 0, "rss_before_engine_mib")
        r3 = pick(precision, 2, 3, "rss_after_mib") - pick(precision, 2, 3, "rss_before_engine_mib")
        out[precision] = {
            "zero3_vs_zero0_state_per_rank": ratio(s3, s0),
            "zero3_vs_zero0_rss_increase_per_rank": ratio(r3, r0),
            "two_vs_one_rank_step_seconds_zero0": ratio(
                pick(precision, 2, 0, "step_seconds"), pick(precision, 1, 0, "step_seconds")
            ),
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
