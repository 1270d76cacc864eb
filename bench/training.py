"""Short training runs of the real pipeline for the training benchmarks.

``train`` runs the Procfile pipeline (redis-server, the DeepSpeed learner, one vLLM sampler) on
the toy model with the demo's settings plus overrides, the sampler pinned to core 0 and the
learner to core 1 (``taskset``, one thread each: the analogue of separate GPUs), then measures
the trained model's greedy held-out accuracy and reads the learner's step log and the sampler's
summary.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, ratio
from toy.demo import ci95, heldout_accuracy, run_pipeline, savings

HELDOUT_SEED = 1000
"""Every training benchmark scores its runs on the same held-out problems, whatever the run's
seed (so runs of different seeds and arms are paired on them)."""


def pinned_procfile(run: Path) -> Path:
    """A Procfile like the repository's, with the sampler on core 0 and the learner on core 1
    (both on core 0 on a one-core machine). ``exec`` keeps honcho's signals on the process itself,
    not on a shell around it."""
    cores = sorted(os.sched_getaffinity(0))
    s_core, l_core = cores[0], cores[1 % len(cores)]
    path = run / "Procfile"
    path.write_text(
        "redis: redis-server ops/redis.conf --port ${REDIS_PORT} --dir ${RUN_DIR}\n"
        f"learner: exec env OMP_NUM_THREADS=1 taskset -c {l_core} treepo-learner --port $PORT\n"
        f"sampler: exec env OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND={s_core} "
        f"taskset -c {s_core} treepo-sampler --port $PORT\n"
    )
    return path


QUICK_SETTINGS = {"TREEPO_LEARNER__DYNAMIC_SAMPLING": "false", "TREEPO_LEARNER__BATCH_PROMPTS": "4"}
"""Quick modes train an almost untrained test model: keep every tree so that steps happen."""


def train(
    name: str,
    model: Path,
    settings: dict[str, str],
    heldout: int,
    timeout_s: float = 1800,
    run: Path | None = None,
) -> dict[str, Any]:
    """One pinned training run (in ``run``, default a new folder under runs/bench/); returns its
    measurements, all read from the run's own files (raises if the learner did not finish)."""
    run = run or ROOT / "runs" / "bench" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir(parents=True)
    started = time.monotonic()
    code = run_pipeline(
        run,
        model,
        steps=int(settings.pop("TREEPO_LEARNER__TOTAL_STEPS", "1000000")),
        samplers=1,
        timeout_s=timeout_s,
        extra=settings,
        procfile=pinned_procfile(run),
        quiet=True,
    )
    trained = run / "learner" / "model"
    if not (trained / "config.json").is_file():
        raise RuntimeError(f"{name}: the pipeline failed (exit {code}); see {run / 'pipeline.log'}")
    log = run / "learner" / "steps.jsonl"
    steps = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    if not steps:
        raise RuntimeError(f"{name}: no learner step within the budget; see {run / 'pipeline.log'}")
    sampler = [json.loads(p.read_text()) for p in (run / "samplers").glob("*/summary.json")]
    last = steps[-1]
    from pipeline.checkpoints import latest_checkpoint

    ckpt = latest_checkpoint(run / "learner" / "checkpoints")
    final = json.loads((ckpt / "state.json").read_text()) if ckpt else {}
    trees = sum(s["trees"] for s in steps)
    training_s = last["training_seconds"]
    accuracy = heldout_accuracy(trained, heldout, seed=HELDOUT_SEED)
    s_wall = sum(s["wall_seconds"] for s in sampler)
    cost = savings(run)
    return {
        "run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run),
        "steps": len(steps),
        "trained_trees": trees,
        "training_seconds": training_s,
        "trained_trees_per_minute": 60 * trees / training_s,
        "trees_sampled": sum(s["treepo_sampler_trees_total"] for s in sampler),
        "tokens_received": final.get("tokens_received", last["tokens_received"]),
        "learner_idle_fraction": ratio(last["wait_seconds"], training_s),
        "sampler_idle_fraction": ratio(
            sum(s["treepo_sampler_idle_seconds_total"] for s in sampler), s_wall
        ),
        "staleness_mean": sum(s["staleness_mean"] for s in steps) / len(steps),
        "heldout_accuracy": accuracy,
        "heldout_ci95": ci95(accuracy, heldout),
        "heldout_problems": heldout,
        "wall_seconds": time.monotonic() - started,
        "exit_code": code,
        "trained_leaves": sum(s["leaves"] for s in steps),
        "is_weight_mean": sum(s["is_weight_mean"] for s in steps) / len(steps),
        "is_ess_mean": sum(s["is_ess"] for s in steps) / len(steps),
        "recomputed_tokens": cost["recomputed_tokens"],
        "tokens_decoded": cost["treepo_sampler_tokens_decoded_total"],
        "engine_seconds": cost["treepo_sampler_gpu_seconds_used_total"],
        "engine_seconds_independent": cost["treepo_sampler_gpu_seconds_independent_total"],
        "curve": curve(run / "learner", steps),
    }


def curve(work: Path, steps: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The learner's in-run evaluations (``evals.jsonl``, when ``TREEPO_LEARNER__EVAL_EVERY`` is
    set) with the tokens received and training seconds at their step."""
    path = work / "evals.jsonl"
    if not path.is_file():
        return []
    at = {s["step"]: s for s in steps}
    points = []
    for line in path.read_text().splitlines():
        e = json.loads(line)
        s = at.get(e["step"])
        if s is not None:
            points.append(
                {
                    "step": e["step"],
                    "accuracy": e["accuracy"],
                    "tokens": s["tokens_received"],
                    "seconds": s["training_seconds"],
                }
            )
    return points
