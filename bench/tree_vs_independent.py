"""Tree vs independent sampling on one vLLM engine (continuous batching): same prompts, same
number of trajectories per prompt, same engine, side by side in one run.

Two models, each on its own engine, one after the other:

* ``compute``: a randomly initialised Qwen2 model large enough that compute, not per-step
  overhead, dominates on CPU (hidden 512, 8 layers, ~25M parameters). Every path is decoded to
  its budget (``ignore_eos``), so both methods produce exactly the same trajectory lengths.
* ``toy``: the toy model on the built-in task with the demo's tree shape (natural lengths: EOS
  and the boxed answer end a path), the shape, trees in flight and engine threads ``make demo``
  trains with.

Both methods run the way the sampler does: a fixed number of prompts in flight, a new one
started the moment one finishes (compute model: ``--in-flight``, the sampler's default
``TREEPO_SAMPLER__TREES_IN_FLIGHT`` unless given, over ``--prompts``, twice that by default, so
most of the run is the sampler's steady state and not one wave that starts together and drains
together; toy model: the demo's trees in flight). Trees: ``TreeSampler.grow`` on
``VLLMPathGenerator`` (every path its own request, no barrier between trees or levels). Independent: one ``n = width`` request per prompt
(vLLM's parallel sampling) returning whole answers, its cheapest form, with its own samples and
lengths. Every repeat runs the independent
baseline and each tree shape, in reverse order every other repeat, so drift affects all alike;
ratios are taken within each repeat and their median over repeats counts. Measured per run: wall seconds, the engine's busy seconds (step by step), engine
steps, tokens decoded and prefilled.

The cost model that the sampler and the demo price independent sampling with
(``pipeline.treepo.costs``) is checked here: it is fitted on the tree run's own engine steps, prices the
independent counterfactual of the trees' prompts from the trees alone, and the price is compared
with the independent run's measured engine-seconds (``cost_model.predicted_vs_measured``).

    python -m bench.tree_vs_independent [--quick]
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, Progress, parser, ratio, write_result
from pipeline.config import TreeConfig
from pipeline.treepo.costs import CostModel, StepConcurrency, Work, independent_work
from pipeline.treepo.sampling import TreeSampler
from pipeline.treepo.tasks import ArithTask, arith_reward
from pipeline.wire.messages import TreeRollout

DEMO_SHAPE = "demo"


@dataclass(frozen=True)
class TreeShape:
    name: str
    width: int
    segment: int
    depth: int
    divergence: int | tuple[int, int]

    def config(self, eos: int | None, budget: int, natural: bool) -> TreeConfig:
        rng = self.divergence if isinstance(self.divergence, tuple) else None
        return TreeConfig(
            width=self.width,
            segment_tokens=self.segment,
            max_depth=self.depth,
            branching=2,
            initial_divergence=self.divergence if isinstance(self.divergence, int) else 2,
            initial_divergence_range=rng,
            max_response_tokens=budget,
            eos_token_id=eos,
            repetition_ngram=0,
            answer_stop="boxed" if natural else "none",
        )


def compute_shapes(budget: int, quick: bool) -> list[TreeShape]:
    """16 leaves within ``budget`` tokens (b = 2 needs depth >= 4 from a root fan-out of 2)."""
    s = budget
    if quick:
        return [TreeShape(f"seg{s // 4}-d4-div2", 16, s // 4, 4, 2)]
    return [
        TreeShape(f"seg{s // 8}-d8-div2", 16, s // 8, 8, 2),
        TreeShape(f"seg{s // 4}-d4-div2", 16, s // 4, 4, 2),
        TreeShape(f"seg{s // 4}-d4-div4", 16, s // 4, 4, 4),
        TreeShape(f"seg{s // 4}-d4-div2to8", 16, s // 4, 4, (2, 8)),
    ]


def toy_shapes(quick: bool) -> list[TreeShape]:
    """The demo's shape (toy/demo.py) first, then variants of it."""
    from toy.demo import DEMO_SETTINGS

    w = int(DEMO_SETTINGS["TREEPO_TREE__WIDTH"])
    seg = int(DEMO_SETTINGS["TREEPO_TREE__SEGMENT_TOKENS"])
    depth = int(DEMO_SETTINGS["TREEPO_TREE__MAX_DEPTH"])
    d0 = int(DEMO_SETTINGS["TREEPO_TREE__INITIAL_DIVERGENCE"])
    demo = TreeShape(DEMO_SHAPE, w, seg, depth, d0)
    if quick:
        return [demo]
    variants = [TreeShape(f"seg{seg}-d{depth}-div{d}", w, seg, depth, d) for d in (1, 2, 4)]
    return [demo, *[v for v in variants if v.divergence != d0]]


def build_compute_model(out: Path, quick: bool) -> Path:
    """A random-weight Qwen2 model with the toy tokenizer (no training: speed only)."""
    from toy.kit import ToySpec, build_tokenizer, make_model, save_model

    spec = (
        ToySpec(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, max_positions=256)
        if quick
        else ToySpec(
            hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536, max_positions=512
        )
    )
    if (out / "config.json").is_file():
        return out
    import torch

    torch.manual_seed(0)
    model = make_model(spec)
    params = sum(p.numel() for p in model.parameters())
    return save_model(model, build_tokenizer(), out, {"random_init": True, "parameters": params})


class Run:
    """What one run of one method did on the engine (meter deltas, wall time, steps)."""

    def __init__(self, gen: Any) -> None:
        self.gen = gen
        self.steps: list[Any] = []
        gen.reset_prefix_cache()
        gen.meter.listeners.append(self.steps.append)
        self.before = gen.meter.snapshot()
        self.started = time.perf_counter()

    def finish(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        self.gen.meter.listeners.remove(self.steps.append)
        after = self.gen.meter.snapshot()
        d = {k: after[k] - self.before[k] for k in after}
        return {
            "seconds": wall,
            "engine_seconds": d["busy_seconds"],
            "in_step_seconds": d["in_step_seconds"],
            "engine_steps": d["steps"],
            "prefill_tokens": d["prefill_tokens"],
            "cached_prefill_tokens": d["cached_tokens"],
            "decoded_tokens": d["decoded_tokens"],
            "requests_started": d["requests_started"],
            "request_start_steps": d["start_steps"],
        }


async def _in_flight(items: list[Any], limit: int, work: Any) -> tuple[list[Any], float]:
    """``work(item)`` for every item, ``limit`` at a time, each started when a slot frees; also
    the time-average number in flight."""
    sem = asyncio.Semaphore(limit)
    running, area, last = 0, 0.0, time.perf_counter()

    def tick(by: int) -> None:
        nonlocal running, area, last
        now = time.perf_counter()
        area += running * (now - last)
        last, running = now, running + by

    async def one(item: Any) -> Any:
        async with sem:
            tick(+1)
            try:
                return await work(item)
            finally:
                tick(-1)

    started = time.perf_counter()
    out = await asyncio.gather(*(one(i) for i in items))
    tick(0)
    return out, area / max(1e-9, time.perf_counter() - started)


def row(
    kind: str, name: str, run: dict[str, float], leaves: int, rewards: list[float]
) -> dict[str, Any]:
    return {
        "method": kind,
        "config": name,
        **run,
        "trajectories": leaves,
        "trajectories_per_second": leaves / run["seconds"],
        "engine_seconds_per_trajectory": run["engine_seconds"] / leaves,
        # per engine step: inside vLLM's step, and this process's own work between steps
        "in_step_ms_per_step": 1000 * ratio(run["in_step_seconds"], run["engine_steps"]),
        "between_steps_ms_per_step": 1000
        * ratio(run["engine_seconds"] - run["in_step_seconds"], run["engine_steps"]),
        "prefix_cache_hit_rate": ratio(
            run["cached_prefill_tokens"], run["prefill_tokens"] + run["cached_prefill_tokens"]
        ),
        "reward_mean": statistics.fmean(rewards) if rewards else 0.0,
    }


def run_trees(
    gen: Any, shape: TreeShape, prompts: list[list[int]], answers: list[str], ctx: dict[str, Any]
) -> dict[str, Any]:
    cfg = shape.config(ctx["eos"], ctx["budget"], ctx["natural"])
    sampler = TreeSampler(gen, cfg, rng=ctx["seed"], decode=ctx["decode"])
    run = Run(gen)
    growing = StepConcurrency()  # what the sampler prices independent steps with

    async def counted(prompt: list[int]) -> TreeRollout:
        growing.started()
        try:
            return await sampler.grow(prompt)
        finally:
            growing.ended()

    async def grow(prompt: list[int]) -> TreeRollout:
        tree: TreeRollout = await gen.call(
            counted(prompt)
        )  # on the engine's loop, as in the sampler
        return tree

    def step(_: Any) -> None:  # the meter calls it on the engine's loop too
        growing.step()

    gen.meter.listeners.append(step)
    try:
        trees, concurrency = asyncio.run(_in_flight(prompts, ctx["in_flight"], grow))
    finally:
        gen.meter.listeners.remove(step)
    measured = run.finish()
    rewards = [
        arith_reward(ctx["decode"](t.response_tokens(x.node).tolist()), a)
        for t, a in zip(trees, answers)
        for x in t.leaves
    ]
    out = row("tree", shape.name, measured, sum(len(t.leaves) for t in trees), rewards)
    out["estimated_independent_tokens"] = sum(t.stats.independent_tokens for t in trees)
    out["leaf_sum_tokens"] = sum(t.response_length(x.node) for t in trees for x in t.leaves)
    out["fallbacks_per_tree"] = statistics.fmean(t.stats.fallbacks for t in trees)
    # steps from sending a path's request to its first token (1: the next step); a path that
    # goes on past a boundary gets its next token in the next step
    out["mean_request_start_steps"] = ratio(
        measured["request_start_steps"], measured["requests_started"]
    )
    out["mean_trees_in_flight"] = concurrency
    out["mean_trees_growing_per_step"] = growing.mean
    out["predicted"] = predict_independent(run.steps, trees, growing.mean)
    return out


def predict_independent(
    steps: list[Any], trees: list[TreeRollout], concurrency: float
) -> dict[str, float]:
    """The sampler's pricing of independent sampling of these trees' prompts: the cost model
    fitted on this run's engine steps, applied to the counterfactual the trees estimate."""
    model = CostModel()
    for s in steps:
        model.observe(Work(s.prefill_tokens, s.decoded_tokens, 1), s.seconds)
    work = Work(0.0, 0.0, 0.0)
    for t in trees:
        longest = max((t.response_length(x.node) for x in t.leaves), default=0)
        work += independent_work(
            len(t.prompt_token_ids), len(t.leaves), t.mean_leaf_length(), longest, concurrency
        )
    a, b, c = model.coef
    return {
        "engine_seconds": model.estimate(work),
        "engine_steps": work.steps,
        "decoded_tokens": work.decoded_tokens,
        "prefill_tokens": work.prefill_tokens,
        "fitted_prefill_seconds_per_token": a,
        "fitted_decode_seconds_per_token": b,
        "fitted_step_seconds": c,
        "fit_tree_seconds": model.estimate(
            Work(
                sum(s.prefill_tokens for s in steps),
                sum(s.decoded_tokens for s in steps),
                len(steps),
            )
        ),
    }


def run_independent(
    gen: Any, prompts: list[list[int]], answers: list[str], ctx: dict[str, Any]
) -> dict[str, Any]:
    width, budget = ctx["width"], ctx["budget"]

    async def sample(p: list[int]) -> list[list[int]]:
        return await gen.sample_independent(p, width, budget)

    run = Run(gen)
    outs, _ = asyncio.run(_in_flight(prompts, ctx["in_flight"], sample))
    measured = run.finish()
    rewards = [arith_reward(ctx["decode"](s), a) for group, a in zip(outs, answers) for s in group]
    return row("independent", f"n{width}", measured, sum(len(g) for g in outs), rewards)


def measure(
    model: Path,
    shapes: list[TreeShape],
    prompts_n: int,
    budget: int,
    repeats: int,
    forced: bool,
    in_flight: int,
    threads: str | None = None,
) -> dict[str, Any]:
    import os

    from workers.engine import EngineOptions, VLLMPathGenerator

    saved = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:  # the engine's process inherits it
        os.environ["OMP_NUM_THREADS"] = threads
    try:
        gen = VLLMPathGenerator(
            EngineOptions(model=str(model), dtype="float32", ignore_eos=forced, kv_cache_gib=2)
        )
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    try:
        tok = gen.tokenizer
        problems = ArithTask().problems("heldout", prompts_n, seed=7)
        prompts = [list(tok(p.prompt)["input_ids"]) for p in problems]
        answers = [p.answer for p in problems]

        def decode(ids: list[int]) -> str:
            return str(tok.decode(ids, skip_special_tokens=True))

        rows: list[dict[str, Any]] = []
        for width in sorted({s.width for s in shapes}):
            ctx = {
                "eos": None if forced else gen.eos_token_id,
                "budget": budget,
                "natural": not forced,
                "decode": decode,
                "width": width,
                "in_flight": in_flight,
                "seed": 0,
            }
            # one untimed pass of each method warms the engine (first steps allocate)
            run_independent(gen, prompts[:2], answers[:2], ctx)
            run_trees(gen, shapes[0], prompts[:2], answers[:2], ctx)
            mine = [s for s in shapes if s.width == width]
            progress = Progress(repeats * (len(mine) + 1), model.name)
            for r in range(repeats):
                ctx["seed"] = r
                runs: list[Any] = [None, *mine]  # None: the independent baseline
                for what in runs if r % 2 == 0 else runs[::-1]:  # drift hits both orders
                    if what is None:
                        out = run_independent(gen, prompts, answers, ctx)
                    else:
                        out = run_trees(gen, what, prompts, answers, ctx)
                    rows.append({"repeat": r, **out})
                    progress.step(_brief(rows[-1]))
    finally:
        gen.close()
    return summarize(rows, shapes)


def _brief(r: dict[str, Any]) -> str:
    return (
        f"{r['method']:11s} {r['config']:18s} {r['seconds']:7.2f}s engine {r['engine_seconds']:7.2f}s "
        f"steps {r['engine_steps']:6.0f} decoded {r['decoded_tokens']:7.0f} "
        f"prefill {r['prefill_tokens']:7.0f} traj/s {r['trajectories_per_second']:7.1f} "
        f"ms/step {r['in_step_ms_per_step']:.2f} + {r['between_steps_ms_per_step']:.2f}"
    )


def summarize(rows: list[dict[str, Any]], shapes: list[TreeShape]) -> dict[str, Any]:
    """Median over repeats per configuration; each tree shape against the independent baseline
    of the same width in the same repeats, and its price of that baseline against the measured
    one (per repeat, then the median)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)

    def med(rs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {k: rs[0][k] for k in ("method", "config")}
        for k, v in rs[0].items():
            if isinstance(v, (int, float)) and k != "repeat":
                out[k] = statistics.median(r[k] for r in rs)
        return out

    configs = []
    for shape in shapes:
        base_rows = {r["repeat"]: r for r in by[f"n{shape.width}"]}
        mine = by[shape.name]
        m = med(mine)
        base = med(list(base_rows.values()))
        errors = [
            r["predicted"]["engine_seconds"] / base_rows[r["repeat"]]["engine_seconds"]
            for r in mine
        ]
        speed = [
            r["trajectories_per_second"] / base_rows[r["repeat"]]["trajectories_per_second"]
            for r in mine
        ]
        cost = [
            r["engine_seconds_per_trajectory"]
            / base_rows[r["repeat"]]["engine_seconds_per_trajectory"]
            for r in mine
        ]
        token_errors = [
            r["estimated_independent_tokens"] / base_rows[r["repeat"]]["decoded_tokens"]
            for r in mine
        ]
        configs.append(
            {
                **m,
                "width": shape.width,
                "predicted": {
                    k: statistics.median(r["predicted"][k] for r in mine)
                    for k in mine[0]["predicted"]
                },
                "trajectories_per_second_ratio": statistics.median(speed),
                "trajectories_per_second_ratio_per_repeat": speed,
                "engine_seconds_per_trajectory_ratio": statistics.median(cost),
                "decoded_tokens_ratio": ratio(m["decoded_tokens"], base["decoded_tokens"]),
                "reward_difference": m["reward_mean"] - base["reward_mean"],
                "cost_model": {
                    "predicted_vs_measured": statistics.median(errors),
                    "per_repeat": errors,
                    "measured_independent_engine_seconds": base["engine_seconds"],
                },
                "independent_tokens_estimate_vs_measured": statistics.median(token_errors),
                "leaf_sum_vs_measured": ratio(m["leaf_sum_tokens"], base["decoded_tokens"]),
            }
        )
    baselines = {name: med(rs) for name, rs in by.items() if name.startswith("n")}
    best = max(configs, key=lambda c: c["trajectories_per_second_ratio"])
    return {"independent": baselines, "trees": configs, "best": best["config"], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument(
        "--prompts", type=int, default=None, help="compute model: prompts per run (2 x in flight)"
    )
    p.add_argument(
        "--in-flight",
        type=int,
        default=None,
        help="compute model: prompts in flight (the sampler's default trees in flight; 2 quick)",
    )
    p.add_argument(
        "--shapes",
        default="",
        help="compute model: comma-separated tree shapes to run (default: all)",
    )
    p.add_argument("--budget", type=int, default=None, help="compute model: tokens per path (128)")
    p.add_argument("--repeats", type=int, default=None, help="repeats (3; 1 quick)")
    p.add_argument("--toy-repeats", type=int, default=None, help="toy model repeats (5)")
    p.add_argument("--toy-prompts", type=int, default=None, help="toy model: prompts (256)")
    p.add_argument("--skip-compute", action="store_true", help="only the toy model")
    p.add_argument("--skip-toy", action="store_true", help="only the compute model")
    args = p.parse_args(argv)
    from pipeline.config import SamplerOptions
    from toy.demo import DEMO_SETTINGS

    in_flight = args.in_flight or (2 if args.quick else SamplerOptions().trees_in_flight)
    prompts = args.prompts or 2 * in_flight
    budget = args.budget or (16 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    result: dict[str, Any] = {
        "branching": 2,
        "prompts": prompts,
        "in_flight": in_flight,
        "budget_tokens": budget,
        "repeats": repeats,
    }
    if not args.skip_compute:
        cache = ROOT / ".cache" / ("bench-compute-quick" if args.quick else "bench-compute")
        shapes = compute_shapes(budget, args.quick)
        if args.shapes:
            wanted = args.shapes.split(",")
            unknown = sorted(set(wanted) - {s.name for s in shapes})
            if unknown:
                p.error(f"unknown --shapes {unknown}; known: {[s.name for s in shapes]}")
            shapes = [s for s in shapes if s.name in wanted]
        compute = measure(
            build_compute_model(cache, args.quick),
            shapes,
            prompts,
            budget,
            repeats,
            forced=True,
            in_flight=in_flight,
        )
        result["compute_model"] = {
            "path": str(cache.relative_to(ROOT)),
            "parameters": _params(cache),
            "in_flight": in_flight,
            **compute,
        }
        best = next(c for c in compute["trees"] if c["config"] == compute["best"])
        result["trajectories_per_second_ratio"] = best["trajectories_per_second_ratio"]
        result["decoded_tokens_ratio"] = best["decoded_tokens_ratio"]
        result["best_configuration"] = compute["best"]
        result["compute_cost_model_predicted_vs_measured"] = best["cost_model"][
            "predicted_vs_measured"
        ]
    if not args.quick and not args.skip_toy:
        from toy.kit import build_toy_model

        toy = build_toy_model(ROOT / "runs" / "toy-model", seed=0)
        in_flight = int(DEMO_SETTINGS["TREEPO_SAMPLER__TREES_IN_FLIGHT"])
        toy_prompts = args.toy_prompts or 256
        toy_result = measure(
            toy,
            toy_shapes(False),
            toy_prompts,
            int(DEMO_SETTINGS["TREEPO_TREE__SEGMENT_TOKENS"])
            * int(DEMO_SETTINGS["TREEPO_TREE__MAX_DEPTH"]),
            args.toy_repeats or 5,
            forced=False,
            in_flight=in_flight,
            threads=DEMO_SETTINGS.get("OMP_NUM_THREADS"),
        )
        result["toy_model"] = {
            "parameters": _params(toy),
            "prompts": toy_prompts,
            "in_flight": in_flight,
            **toy_result,
        }
        demo = next(c for c in toy_result["trees"] if c["config"] == DEMO_SHAPE)
        result["toy_trajectories_per_second_ratio"] = demo["trajectories_per_second_ratio"]
        result["toy_engine_seconds_per_trajectory_ratio"] = demo[
            "engine_seconds_per_trajectory_ratio"
        ]
        result["toy_cost_model_predicted_vs_measured"] = demo["cost_model"]["predicted_vs_measured"]
        result["toy_independent_tokens_estimate_vs_measured"] = demo[
            "independent_tokens_estimate_vs_measured"
        ]
    result["anchor"] = "TreePO paper, H100: about +40% trajectories/s and +30-35% tokens/s"
    write_result("tree_vs_independent", args, result)
    if "trajectories_per_second_ratio" in result:
        print(
            f"compute model, best {result['best_configuration']}: trajectories/s "
            f"x{result['trajectories_per_second_ratio']:.2f}, decoded tokens "
            f"x{result['decoded_tokens_ratio']:.2f}"
        )
    if "toy_trajectories_per_second_ratio" in result:
        print(
            f"toy model, demo shape: trajectories/s x{result['toy_trajectories_per_second_ratio']:.2f}"
        )
    return 0


def _params(model_dir: Path) -> int | None:
    import json

    meta = model_dir / "toy_meta.json"
    return json.loads(meta.read_text()).get("parameters") if meta.is_file() else None


if __name__ == "__main__":
    raise SystemExit(main())
