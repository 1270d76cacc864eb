"""Multi-seed comparisons: every (arm, seed) a real pipeline run under the same budget.

A comparison is a set of arms (each a set of ``TREEPO_*`` overrides of the toy recipe) and a
budget (decoded tokens received by the learner, or training wall seconds). Every (arm, seed) is
one run of the Procfile pipeline (redis-server, the DeepSpeed learner, one vLLM sampler, pinned
to a core each: ``bench.training.train``), one at a time, with ``TREEPO_RUN__SEED`` = the seed
(prompt order, tree shapes, the engine's sampling: ``pipeline.seeds``). Seeds pair the arms: run
``s`` of every arm sees the same prompts in the same order and starts from the same toy model.

Reported per arm (``bench/results/compare-<name>.json``, a Markdown table and a PNG of held-out
accuracy against the budget, seeds as thin lines and the arm's mean in bold):

* held-out greedy accuracy after the budget (400 problems, the same for every run): the mean
  and its 95 % interval over seeds (Student t), with each seed's own accuracy and interval;
* whether the arm learned: its gain over the untrained model's accuracy, with an interval over
  seeds that excludes 0;
* engine-seconds used and priced for independent sampling, tokens decoded, trained trees per
  minute and wall seconds (means over seeds);
* against the first arm, the paired difference per seed, its mean and interval, and whether it
  separates (the interval excludes 0).

Finished runs are kept under ``runs/compare/<name>/`` and skipped when the command runs again
(so a long comparison resumes where it stopped); progress lines show runs done and an ETA.

    python -m bench.compare treepo-vs-grpo|async|advantage [--seeds 5]
    python -m bench.compare swap-kv --seeds 3      # weight swaps: keep vs recompute the KV cache
    python -m bench.compare quick          # 2 arms (one with learning rate 0) x 2 seeds, for CI
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    QUICK_RESULTS,
    RESULTS,
    ROOT,
    Progress,
    add_model_option,
    parser,
    toy_model,
    write_result,
)
from bench.training import HELDOUT_SEED, QUICK_SETTINGS, train
from toy.demo import ci95, heldout_accuracy

WIDTH = 8


@dataclass(frozen=True)
class Comparison:
    doc: str
    arms: dict[str, dict[str, str]]
    budget: str
    """``tokens`` (TREEPO_LEARNER__TOKEN_BUDGET), ``seconds`` (TREEPO_LEARNER__MAX_SECONDS) or
    ``steps`` (TREEPO_LEARNER__TOTAL_STEPS)."""
    amount: float
    settings: dict[str, str]
    """Settings every arm shares."""


TREE = {
    "TREEPO_TREE__INITIAL_DIVERGENCE": "4",
    "TREEPO_TREE__BRANCHING": "2",
    "TREEPO_LOSS__ADVANTAGE": "average",
}
COMPARISONS = {
    "treepo-vs-grpo": Comparison(
        "TreePO tree sampling vs GRPO-style independent sampling at an equal token budget",
        {
            "treepo": TREE,
            "grpo": {
                "TREEPO_TREE__INITIAL_DIVERGENCE": str(WIDTH),
                "TREEPO_TREE__BRANCHING": "1",
                "TREEPO_LOSS__ADVANTAGE": "root",
            },
        },
        "tokens",
        60_000,
        {"TREEPO_TREE__WIDTH": str(WIDTH)},
    ),
    "async": Comparison(
        "Async (max staleness 1, 2, 4) vs sync (0) pipelines at equal training wall time",
        {f"staleness-{s}": {"TREEPO_RUN__MAX_STALENESS": str(s)} for s in (0, 1, 2, 4)},
        "seconds",
        60,
        {},
    ),
    "advantage": Comparison(
        "TreePO advantage variants (average, size-weighted, root) at an equal token budget",
        {a: {**TREE, "TREEPO_LOSS__ADVANTAGE": a} for a in ("average", "size_weighted", "root")},
        "tokens",
        60_000,
        {"TREEPO_TREE__WIDTH": str(WIDTH)},
    ),
    "swap-kv": Comparison(
        "Weight swaps that keep the running paths' KV cache vs recompute it, same learner steps",
        {m: {"TREEPO_SAMPLER__SWAP_KV": m} for m in ("recompute", "keep")},
        "steps",
        40,
        {},
    ),
    "quick": Comparison(
        "The harness itself: the demo's settings vs learning rate 0 (must not learn)",
        {"train": {}, "lr-0": {"TREEPO_LEARNER__LR": "0"}},
        "tokens",
        1500,
        {**QUICK_SETTINGS, "TREEPO_LEARNER__EVAL_SIZE": "8"},
    ),
}

BUDGET_SETTING = {
    "tokens": "TREEPO_LEARNER__TOKEN_BUDGET",
    "seconds": "TREEPO_LEARNER__MAX_SECONDS",
    "steps": "TREEPO_LEARNER__TOTAL_STEPS",
}

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
T975 += [2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086]
"""Two-sided 95 % quantiles of Student's t for 1..20 degrees of freedom (1.96 beyond)."""


def interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95 % half-width over seeds (Student t); no width from a single value."""
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return {"mean": mean, "ci95": t * statistics.stdev(values) / math.sqrt(n), "n": n}


def excludes_zero(iv: dict[str, Any]) -> bool:
    return iv["ci95"] is not None and abs(iv["mean"]) > iv["ci95"]


def run_one(
    cmp: Comparison, arm: str, seed: int, folder: Path, model: Path, heldout: int, quick: bool
) -> dict[str, Any]:
    """The (arm, seed) run: its record from an earlier invocation, else a new run."""
    record = folder / arm / f"seed-{seed}.json"
    if record.is_file():
        return dict(json.loads(record.read_text()))
    run = folder / arm / f"seed-{seed}"
    if run.exists():  # a run that did not finish: start it again from nothing
        import shutil

        shutil.rmtree(run)
    key = BUDGET_SETTING[cmp.budget]
    settings = {
        "TREEPO_LEARNER__CHECKPOINT_EVERY": "10",
        "TREEPO_LEARNER__EVAL_EVERY": "1" if quick else "10",
        **cmp.settings,
        **cmp.arms[arm],
        key: str(cmp.amount),
        "TREEPO_RUN__SEED": str(seed),
    }
    result = {
        "arm": arm,
        "seed": seed,
        **train(f"{arm}-s{seed}", model, settings, heldout, run=run),
    }
    record.write_text(json.dumps(result, indent=1) + "\n")
    return result


RUN_FIGURES = (
    "engine_seconds",
    "engine_seconds_independent",
    "tokens_decoded",
    "recomputed_tokens",
    "trained_trees_per_minute",
    "is_weight_mean",
    "is_ess_mean",
    "wall_seconds",
    "steps",
)
"""What every run reports, averaged over the seeds of an arm."""


def summarise(cmp: Comparison, runs: list[dict[str, Any]], base: float) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for arm in cmp.arms:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        acc = [r["heldout_accuracy"] for r in mine]
        gain = interval([a - base for a in acc])
        arms[arm] = {
            "settings": cmp.arms[arm],
            "heldout_accuracy": interval(acc),
            "seeds": [
                {
                    "seed": r["seed"],
                    "heldout_accuracy": r["heldout_accuracy"],
                    "heldout_ci95": r["heldout_ci95"],
                    "steps": r["steps"],
                    "run": r["run"],
                }
                for r in mine
            ],
            "gain_over_untrained": gain,
            "learned": excludes_zero(gain) and gain["mean"] > 0,
            **{k: interval([float(r[k]) for r in mine])["mean"] for k in RUN_FIGURES},
            "engine_seconds_per_trained_leaf": interval(
                [r["engine_seconds"] / max(1, r.get("trained_leaves", 0)) for r in mine]
            )["mean"],
        }
    first = next(iter(cmp.arms))
    paired: dict[str, Any] = {}
    for arm in list(cmp.arms)[1:]:
        by_seed = {r["seed"]: r["heldout_accuracy"] for r in runs if r["arm"] == first}
        diffs = [
            r["heldout_accuracy"] - by_seed[r["seed"]]
            for r in runs
            if r["arm"] == arm and r["seed"] in by_seed
        ]
        iv = interval(diffs)
        paired[f"{arm} - {first}"] = {**iv, "separates": excludes_zero(iv)}
    return {"arms": arms, "paired_differences": paired}


def table(data: dict[str, Any]) -> str:
    """The comparison's Markdown: one row per arm, then the paired differences."""

    def pm(iv: dict[str, Any]) -> str:
        return f"{iv['mean']:.3f}" + (f" ± {iv['ci95']:.3f}" if iv["ci95"] is not None else "")

    budget = data["budget"]
    lines = [
        f"{data['seeds']} seeds per arm; budget {budget['amount']:g} {budget['kind']}; held-out: "
        f"{data['heldout_problems']} problems, untrained model {data['untrained_accuracy']:.3f}.",
        "",
        "| arm | held-out (mean ± 95 % over seeds) | per seed | learned | engine-s used / "
        "independent | engine-s per trained leaf | tokens decoded | recomputed | trees/min | "
        "IS weight / ESS | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in data["arms"].items():
        seeds = ", ".join(f"{s['heldout_accuracy']:.2f}" for s in a["seeds"])
        lines.append(
            f"| {arm} | {pm(a['heldout_accuracy'])} | {seeds} | "
            f"{'yes' if a['learned'] else 'no'} ({pm(a['gain_over_untrained'])}) | "
            f"{a['engine_seconds']:.0f} / {a['engine_seconds_independent']:.0f} | "
            f"{a['engine_seconds_per_trained_leaf']:.3f} | {a['tokens_decoded']:,.0f} | "
            f"{a['recomputed_tokens']:,.0f} | {a['trained_trees_per_minute']:.0f} | "
            f"{a['is_weight_mean']:.3f} / {a['is_ess_mean']:.3f} | {a['wall_seconds']:.0f} |"
        )
    lines.append("")
    for label, d in data["paired_differences"].items():
        verdict = "separates" if d["separates"] else "does not separate"
        lines.append(f"- paired difference {label}: {pm(d)} ({verdict})")
    return "\n".join(lines) + "\n"


def plot(path: Path, cmp: Comparison, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = {"tokens": "tokens", "seconds": "seconds", "steps": "step"}[cmp.budget]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, arm in enumerate(cmp.arms):
        color = f"C{i}"
        curves = [r["curve"] for r in runs if r["arm"] == arm and r["curve"]]
        for c in curves:
            ax.plot(
                [p[x_key] for p in c], [p["accuracy"] for p in c], color=color, lw=0.6, alpha=0.5
            )
        if curves:  # the mean over seeds at each evaluation all seeds reached
            n = min(len(c) for c in curves)
            xs = [statistics.fmean(c[j][x_key] for c in curves) for j in range(n)]
            ys = [statistics.fmean(c[j]["accuracy"] for c in curves) for j in range(n)]
            ax.plot(xs, ys, color=color, lw=2.5, label=arm)
    labels = {"tokens": "tokens received by the learner", "seconds": "training seconds"}
    ax.set_xlabel(labels.get(x_key, "learner steps"))
    ax.set_ylabel("held-out accuracy (in-run evaluation)")
    ax.set_title(cmp.doc, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    add_model_option(p)
    p.add_argument("comparison", choices=sorted(COMPARISONS))
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (5; 2 for quick)")
    p.add_argument("--heldout", type=int, default=None, help="held-out problems (400; 20 quick)")
    p.add_argument("--work", type=Path, default=None, help="run folder (runs/compare/<name>)")
    args = p.parse_args(argv)
    name = args.comparison
    args.quick = args.quick or name == "quick"
    cmp = COMPARISONS[name]
    seeds = list(range(1, 1 + (args.seeds or (2 if args.quick else 5))))
    heldout = args.heldout or (20 if args.quick else 400)
    folder = args.work or ROOT / "runs" / "compare" / name
    for arm in cmp.arms:
        (folder / arm).mkdir(parents=True, exist_ok=True)
    model = toy_model(args)
    base_file = folder / "untrained.json"
    if not base_file.is_file():
        base_file.write_text(
            json.dumps({"accuracy": heldout_accuracy(model, heldout, HELDOUT_SEED)})
        )
    base = float(json.loads(base_file.read_text())["accuracy"])
    todo = [(a, s) for s in seeds for a in cmp.arms]
    left = [(a, s) for a, s in todo if not (folder / a / f"seed-{s}.json").is_file()]
    print(f"[compare {name}] {len(todo)} runs, {len(todo) - len(left)} already done", flush=True)
    progress = Progress(len(left), f"compare {name}")
    runs = []
    for arm, seed in todo:  # seed by seed, so a stopped comparison has whole pairs
        r = run_one(cmp, arm, seed, folder, model, heldout, args.quick)
        runs.append(r)
        if (arm, seed) in left:
            progress.step(f"{arm} seed {seed}: held-out {r['heldout_accuracy']:.3f}")
    data = {
        "comparison": name,
        "doc": cmp.doc,
        "budget": {"kind": cmp.budget, "amount": cmp.amount},
        "shared_settings": cmp.settings,
        "seeds": len(seeds),
        "heldout_problems": heldout,
        "untrained_accuracy": base,
        "untrained_ci95": ci95(base, heldout),
        **summarise(cmp, runs, base),
        "runs": runs,
    }
    path = write_result(f"compare-{name}", args, data)
    out = path.parent
    (out / f"compare-{name}.md").write_text(f"### {cmp.doc}\n\n" + table(data))
    plot(out / f"compare-{name}.png", cmp, runs)
    print((out / f"compare-{name}.md").read_text())
    return 0


__all__ = ["COMPARISONS", "QUICK_RESULTS", "RESULTS", "interval", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
