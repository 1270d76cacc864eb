"""The main job (``make demo``): an end-to-end TreePO run on the toy model and task, on CPU.

1. build (or reuse) the toy model kit's model (``runs/toy-model``);
2. measure its greedy held-out accuracy on ``--heldout`` problems;
3. run the real pipeline from the Procfile with honcho: redis-server, the learner (DeepSpeed) and
   two vLLM samplers, until the learner reaches its total steps;
4. measure the trained model's held-out accuracy, gather the samplers' savings counters, and
   write ``summary.json``, ``report.png`` and the trained model into the run folder.

The last line printed is the run folder's path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.entry import child_env

ROOT = Path(__file__).resolve().parent.parent

DEMO_SETTINGS = {
    "TREEPO_RUN__NAME": "demo",
    "TREEPO_RUN__MAX_STALENESS": "1",
    "TREEPO_TREE__WIDTH": "8",
    "TREEPO_TREE__SEGMENT_TOKENS": "8",
    "TREEPO_TREE__MAX_DEPTH": "6",
    "TREEPO_TREE__BRANCHING": "2",
    "TREEPO_TREE__INITIAL_DIVERGENCE": "4",
    "TREEPO_SAMPLER__TREES_IN_FLIGHT": "8",
    "TREEPO_SAMPLER__ALLOW_SHORT_SEGMENTS": "true",
    "TREEPO_LEARNER__BATCH_PROMPTS": "8",
    "TREEPO_LEARNER__LR": "1e-4",
    "TREEPO_LEARNER__MINI_BATCHES": "1",
    "TREEPO_LEARNER__CHECKPOINT_EVERY": "10",
    "TREEPO_STREAMS__BLOCK_MS": "200",
    # three busy processes on a small machine: one compute thread each (two vLLM engines with
    # unbound OpenMP threads on every core, plus the learner's, spin against each other)
    "OMP_NUM_THREADS": "1",
}


def ci95(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of a proportion."""
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def heldout_eval(model_dir: Path, n: int, seed: int) -> dict[str, float]:
    """Greedy ``accuracy`` and ``worked_fraction`` (responses that show their steps) of the
    model in ``model_dir`` on ``n`` held-out problems."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.treepo.tasks import ArithTask
    from toy.kit import greedy_eval

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    return greedy_eval(model, tokenizer, ArithTask().problems("heldout", n, seed=seed))


def heldout_accuracy(model_dir: Path, n: int, seed: int) -> float:
    return heldout_eval(model_dir, n, seed)["accuracy"]


def run_pipeline(
    run: Path,
    model: Path,
    steps: int,
    samplers: int,
    timeout_s: float,
    extra: dict[str, str] | None = None,
    procfile: Path | None = None,
    quiet: bool = False,
) -> int:
    """Run the Procfile pipeline (``procfile``, default the repository's) with the demo settings
    plus ``extra`` until the learner ends or ``timeout_s`` passes; returns honcho's exit code."""
    env_file = run / ".env"
    settings = {
        **DEMO_SETTINGS,
        "TREEPO_REDIS__URL": "redis://127.0.0.1:6390/0",
        "TREEPO_LEARNER__MODEL": str(model),
        "TREEPO_SAMPLER__MODEL": str(model),
        "TREEPO_LEARNER__WORK_DIR": str(run / "learner"),
        "TREEPO_SAMPLER__WORK_DIR": str(run / "samplers"),
        "TREEPO_LEARNER__TOTAL_STEPS": str(steps),
        "REDIS_PORT": "6390",
        "RUN_DIR": str(run),
        **(extra or {}),
    }
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    honcho = shutil.which("honcho") or str(Path(sys.executable).parent / "honcho")
    cmd = [
        honcho,
        "start",
        "-f",
        str(procfile or ROOT / "Procfile"),
        "-e",
        str(env_file),
        "-d",
        str(ROOT),
        "-c",
        f"redis=1,learner=1,sampler={samplers},prometheus=0",
    ]
    env = child_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # honcho and the processes write through a pipe: line by line
    log_path = run / "pipeline.log"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    copier = threading.Thread(target=_copy_log, args=(proc, log_path, quiet), daemon=True)
    copier.start()
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logging.getLogger("treepo.demo").warning("pipeline still running after %.0f s", timeout_s)
        return _stop(proc)
    finally:
        # also on an exception here (a test's timeout, Ctrl-C): never leave the pipeline running
        # and never wait for it without a bound
        if proc.poll() is None:
            _stop(proc)
        copier.join(timeout=5)


def _copy_log(proc: subprocess.Popen[str], log_path: Path, quiet: bool) -> None:
    """Copy honcho's output to ``log_path`` (and the interesting lines to stdout)."""
    assert proc.stdout is not None
    with log_path.open("w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if quiet:
                continue
            if (" step " in line and "reward" in line) or "exits" in line or "Traceback" in line:
                print(line.rstrip()[-150:], flush=True)


def _stop(proc: subprocess.Popen[str], grace_s: float = 30.0) -> int:
    """SIGTERM honcho (which stops its processes), then SIGKILL whatever is left of the tree."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        code = proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return code


def weight_updates(run: Path) -> dict[str, Any]:
    """What the learner's weight updates cost on the wire (``learner/weights.jsonl``)."""
    path = run / "learner" / "weights.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    deltas = [r["delta_bytes"] for r in rows if r.get("delta_bytes")]
    computed = sorted(
        r["delta_computed_bytes"] / r["bytes"] for r in rows if r.get("delta_computed_bytes")
    )
    full = [r["bytes"] for r in rows]
    return {
        "weight_versions_published": len(rows),
        "weight_bytes_per_version": full[-1] if full else 0,
        "weight_deltas_offered": len(deltas),
        "weight_delta_computed_fraction_median": computed[len(computed) // 2] if computed else None,
        "weight_delta_bytes_per_update_median": sorted(deltas)[len(deltas) // 2]
        if deltas
        else None,
        "weight_delta_fraction_median": (
            sorted(r["delta_bytes"] / r["bytes"] for r in rows if r.get("delta_bytes"))[
                len(deltas) // 2
            ]
            if deltas
            else None
        ),
    }


def weight_line(summary: dict[str, Any]) -> str:
    """The demo's line on weight updates: their size, what a delta would be, how samplers took
    them (samplers on the learner's machine hard-link the published files: no bytes move)."""
    line = (
        f"[demo] weight updates: {summary['weight_versions_published']} versions of "
        f"{summary['weight_bytes_per_version'] / 1e6:.2f} MB"
    )
    computed = summary.get("weight_delta_computed_fraction_median")
    if computed is not None:
        line += f"; a delta against the previous version is {computed:.0%} of that (median), " + (
            f"offered {summary['weight_deltas_offered']} times"
            if summary["weight_deltas_offered"]
            else "above the 50% at which it is offered"
        )
    taken = summary.get("weight_fetches") or {}
    if any(taken.values()):
        how = ", ".join(f"{k} {v:.0f}" for k, v in taken.items() if v)
        line += f"; samplers took them by {how}"
    return line


def sampler_summaries(run: Path) -> list[dict[str, Any]]:
    """Every sampler's ``summary.json`` of the run (written by ``workers.accounting``)."""
    return [
        json.loads(path.read_text()) for path in sorted((run / "samplers").glob("*/summary.json"))
    ]


def weight_fetches(run: Path) -> dict[str, float]:
    """How the samplers took the weight versions: hard link (the learner's files or another
    sampler's copy), delta or full download."""
    total = {"link": 0.0, "host": 0.0, "delta": 0.0, "full": 0.0}
    for data in sampler_summaries(run):
        for method, n in data.get("weight_fetches", {}).items():
            total[method] = total.get(method, 0.0) + float(n)
    return total


def publish_times(run: Path) -> dict[str, float | None]:
    """The samplers' time-to-publish quantiles (each sampler's own; the slowest is reported)."""
    out: dict[str, float | None] = {"p50": None, "p99": None}
    for data in sampler_summaries(run):
        q = data.get("time_to_publish_seconds", {})
        for k in out:
            v = q.get(k)
            if v is not None:
                out[k] = max(v, out[k] or 0.0)
    return out


def engine_steps(run: Path) -> dict[str, float | None]:
    """Engine steps the samplers ran, the steps independent sampling was priced at, and the mean
    steps from sending a request (a tree path) to its first token (1: the next step)."""
    used = priced = start_sum = start_count = 0.0
    for data in sampler_summaries(run):
        used += float(data.get("treepo_sampler_engine_steps_total", 0.0))
        priced += float((data.get("independent_work") or [0.0, 0.0, 0.0])[2])
        start = data.get("request_start_steps", {})
        start_sum += float(start.get("sum", 0.0))
        start_count += float(start.get("count", 0.0))
    return {
        "engine_steps": used,
        "independent_engine_steps": priced,
        "mean_request_start_steps": start_sum / start_count if start_count else None,
    }


def savings(run: Path) -> dict[str, float]:
    keys = (
        "treepo_sampler_tokens_decoded_total",
        "treepo_sampler_tokens_independent_total",
        "treepo_sampler_gpu_seconds_used_total",
        "treepo_sampler_gpu_seconds_independent_total",
        "treepo_sampler_trees_total",
        "treepo_sampler_leaves_total",
        "treepo_sampler_prefill_tokens_total",
        "treepo_sampler_generation_seconds_total",
        "weight_swap_seconds",
        "treepo_sampler_swap_load_seconds_total",
        "treepo_sampler_swap_reset_seconds_total",
        "treepo_sampler_swap_dropped_tokens_total",
        "treepo_sampler_recomputed_tokens_total",
        "treepo_sampler_recompute_seconds_total",
    )
    total = dict.fromkeys(keys, 0.0)
    for data in sampler_summaries(run):
        for k in keys:
            total[k] += float(data.get(k, 0.0))
    for k in [k for k in total if k.startswith(("treepo_sampler_swap_", "treepo_sampler_rec"))]:
        total[k.removeprefix("treepo_sampler_").removesuffix("_total")] = total.pop(k)
    return total


def plot(run: Path, steps: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = [s["step"] for s in steps]
    # leaves of every tree the learner received (the trained batch is filtered by dynamic
    # sampling and so hovers near 50%); sampled at temperature 1, so below greedy accuracy
    pts = [(s["step"], s.get("sampled_accuracy")) for s in steps]
    pts = [(i, a) for i, a in pts if a is not None]
    xs, acc = [i for i, _ in pts], [a for _, a in pts]
    window = 10
    smooth = [
        sum(acc[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(acc))
    ]
    axes[0].plot(xs, acc, color="tab:blue", alpha=0.3, label="accuracy of sampled leaves")
    axes[0].plot(xs, smooth, color="tab:blue", label=f"the same, mean of the last {window} steps")
    before, after = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    axes[0].errorbar(
        [0, x[-1] if x else 1],
        [before, after],
        yerr=[summary["heldout_ci95_before"], summary["heldout_ci95_after"]],
        fmt="o",
        color="black",
        capsize=4,
        label="greedy held-out accuracy (95% CI)",
    )
    axes[0].set(xlabel="learner step", ylabel="accuracy", title="Learning", ylim=(0, 1))
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].plot(x, [s.get("is_weight_mean", 1.0) for s in steps], label="IS weight mean")
    axes[1].plot(x, [s.get("is_ess", 1.0) for s in steps], label="IS effective sample size")
    axes[1].plot(x, [s["staleness_mean"] for s in steps], label="staleness (versions)")
    axes[1].set(xlabel="learner step", title="Off-policy correction")
    axes[1].legend(fontsize=8)
    bars = {
        "decoded\n(tree)": summary["decoded_tokens"],
        "independent\n(expected)": summary["independent_tokens"],
    }
    saved = summary["gpu_seconds_saved"]
    axes[2].bar(list(bars), list(bars.values()), color=["tab:green", "tab:gray"])
    axes[2].set(
        ylabel="tokens",
        title=f"Tree sampling saved {summary['token_savings']:.0%} of decoded tokens;\n"
        + (
            f"it saved {saved:.1f} engine-seconds"
            if saved >= 0
            else f"it cost {-saved:.1f} more engine-seconds"
        ),
    )
    fig.tight_layout()
    out = run / "report.png"
    fig.savefig(out, dpi=100)
    return out


def summarise(
    run: Path,
    first: dict[str, float],
    last: dict[str, float],
    steps: list[dict[str, Any]],
    heldout: int,
    wall: float,
) -> dict[str, Any]:
    """The run's summary: held-out accuracy before and after (with 95 % intervals), the
    samplers' token and engine-time accounting and the learner's per-step figures."""
    before, after = first["accuracy"], last["accuracy"]
    sav = savings(run)
    decoded = sav["treepo_sampler_tokens_decoded_total"]
    independent = sav["treepo_sampler_tokens_independent_total"]
    used = sav["treepo_sampler_gpu_seconds_used_total"]
    alone = sav["treepo_sampler_gpu_seconds_independent_total"]
    n = max(1, len(steps))
    return {
        "heldout_accuracy_before": before,
        "heldout_accuracy_after": after,
        "heldout_ci95_before": ci95(before, heldout),
        "heldout_ci95_after": ci95(after, heldout),
        "heldout_problems": heldout,
        "heldout_worked_fraction_before": first["worked_fraction"],
        "heldout_worked_fraction_after": last["worked_fraction"],
        "steps": len(steps),
        "wall_seconds": wall,
        "decoded_tokens": decoded,
        "independent_tokens": independent,
        "token_savings": 1 - decoded / independent if independent else 0.0,
        "gpu_seconds_used": used,
        "gpu_seconds_independent": alone,
        "gpu_seconds_saved": alone - used,
        "weight_swap_seconds": sav["weight_swap_seconds"],
        **{k: v for k, v in sav.items() if k.startswith(("swap_", "recompute"))},
        **engine_steps(run),
        "learner_tokens_computed": sum(s.get("tokens_computed", 0.0) for s in steps),
        "learner_tokens_per_leaf": sum(s.get("tokens_per_leaf", 0.0) for s in steps),
        "learner_seconds_saved": sum(
            s["seconds"] * (s["tokens_per_leaf"] / s["tokens_computed"] - 1)
            for s in steps
            if s.get("tokens_computed")
        ),
        "time_to_publish_seconds": publish_times(run),
        **weight_updates(run),
        "weight_fetches": weight_fetches(run),
        "trees": sav["treepo_sampler_trees_total"],
        "leaves": sav["treepo_sampler_leaves_total"],
        "staleness_mean": sum(s["staleness_mean"] for s in steps) / n,
        "is_weight_mean": sum(s.get("is_weight_mean", 1.0) for s in steps) / n,
        "is_ess_mean": sum(s.get("is_ess", 1.0) for s in steps) / n,
        "reward_per_step": [s["reward"] for s in steps],
        "sampled_accuracy_per_step": [s.get("sampled_accuracy") for s in steps],
        "trained_model": str(run / "learner" / "model"),
    }


def report(summary: dict[str, Any], png: Path) -> None:
    """The demo's closing lines."""
    n = summary["heldout_problems"]
    print(
        f"[demo] held-out greedy accuracy: {summary['heldout_accuracy_before']:.3f} "
        f"± {summary['heldout_ci95_before']:.3f} -> {summary['heldout_accuracy_after']:.3f} "
        f"± {summary['heldout_ci95_after']:.3f} ({n} problems); answers that show their steps: "
        f"{summary['heldout_worked_fraction_before']:.0%} -> "
        f"{summary['heldout_worked_fraction_after']:.0%}"
    )
    print(
        f"[demo] tree sampling decoded {summary['decoded_tokens']:.0f} tokens where independent "
        f"sampling of the same prompts is expected to decode {summary['independent_tokens']:.0f} "
        f"({summary['token_savings']:.0%} saved); engine-seconds measured "
        f"{summary['gpu_seconds_used']:.1f}, independent sampling priced at "
        f"{summary['gpu_seconds_independent']:.1f} (saved {summary['gpu_seconds_saved']:.1f}; "
        f"both include the {summary.get('weight_swap_seconds', 0.0):.1f} s of weight swaps)"
    )
    if summary.get("weight_swap_seconds"):
        print(
            f"[demo] weight swaps: {summary['weight_swap_seconds']:.1f} s (loading "
            f"{summary.get('swap_load_seconds', 0.0):.1f} s, emptying the KV cache "
            f"{summary.get('swap_reset_seconds', 0.0):.1f} s); running paths computed "
            f"{summary.get('recomputed_tokens', 0.0):.0f} context tokens again after preemptions "
            f"(about {summary.get('recompute_seconds', 0.0):.1f} engine-seconds)"
        )
    if summary.get("mean_request_start_steps") is not None:
        print(
            f"[demo] engine steps: {summary['engine_steps']:.0f} run, independent sampling priced "
            f"at {summary['independent_engine_steps']:.0f}; a new path's first token came "
            f"{summary['mean_request_start_steps']:.2f} steps after it was sent on average "
            "(1 = the next step; a continuing path's next token comes in the next step)"
        )
    ttp = summary["time_to_publish_seconds"]
    if ttp["p50"] is not None:
        print(
            f"[demo] time from claim to publish per tree: p50 {ttp['p50']:.2f}s, p99 {ttp['p99']:.2f}s"
        )
    if summary.get("weight_versions_published"):
        print(weight_line(summary))
    print(
        f"[demo] tree-packed learner computed {summary['learner_tokens_computed']:.0f} token "
        f"positions where one row per leaf needs {summary['learner_tokens_per_leaf']:.0f}; "
        f"estimated learner seconds saved {summary['learner_seconds_saved']:.1f}"
    )
    print(
        f"[demo] staleness mean {summary['staleness_mean']:.2f}, "
        f"IS weight mean {summary['is_weight_mean']:.3f}, ESS {summary['is_ess_mean']:.3f}; "
        f"picture: {png}; wall {summary['wall_seconds']:.0f}s"
    )


def toy_model() -> Path:
    """The toy model, built once and cached in runs/toy-model (its progress on stdout)."""
    from toy.kit import build_toy_model

    print("[demo] toy model (built once, then cached in runs/toy-model) ...", flush=True)
    progress = logging.StreamHandler(sys.stdout)
    progress.setFormatter(logging.Formatter("[demo] %(message)s"))
    toy_log = logging.getLogger("toy.kit")
    toy_log.addHandler(progress)
    toy_log.setLevel(logging.INFO)
    try:
        return build_toy_model(ROOT / "runs" / "toy-model", seed=0)
    finally:
        toy_log.removeHandler(progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="treepo-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="learner steps")
    parser.add_argument("--samplers", type=int, default=2)
    parser.add_argument("--heldout", type=int, default=400, help="held-out problems per evaluation")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds before the run is stopped"
    )
    parser.add_argument(
        "--learner-ranks", type=int, default=1, help="learner ranks (DeepSpeed data parallel)"
    )
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    args = parser.parse_args(argv)
    started = time.time()
    run = ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    run.mkdir(parents=True)
    print(f"[demo] run folder {run}", flush=True)
    model = toy_model()
    first = heldout_eval(model, args.heldout, seed=1000)
    print(
        f"[demo] held-out greedy accuracy before: {first['accuracy']:.3f} on {args.heldout} problems "
        f"({first['worked_fraction']:.0%} of answers show their steps)",
        flush=True,
    )
    print(
        f"[demo] pipeline: redis + learner ({args.learner_ranks} rank(s), ZeRO "
        f"{args.zero_stage}) + {args.samplers} samplers, {args.steps} steps",
        flush=True,
    )
    learner = {
        "LEARNER_RANKS": str(args.learner_ranks),
        "TREEPO_LEARNER__ZERO_STAGE": str(args.zero_stage),
    }
    code = run_pipeline(run, model, args.steps, args.samplers, args.timeout, learner)
    trained = run / "learner" / "model"
    # honcho's own exit code reflects how the other processes were stopped; the run succeeded
    # when the learner finished its steps and saved the trained model
    if not (trained / "config.json").is_file():
        print(f"[demo] the pipeline failed (exit {code}); see {run / 'pipeline.log'}", flush=True)
        print(run)
        return 1
    last = heldout_eval(trained, args.heldout, seed=1000)
    steps = [
        json.loads(line) for line in (run / "learner" / "steps.jsonl").read_text().splitlines()
    ]
    summary = summarise(run, first, last, steps, args.heldout, time.time() - started)
    summary["learner_world_size"] = args.learner_ranks
    summary["zero_stage"] = args.zero_stage
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    report(summary, plot(run, steps, summary))
    print(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
