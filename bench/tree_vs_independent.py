"""Tree vs independent sampling on one vLLM engine: same prompts, 16 leaves per prompt, same
per-trajectory token budget.

Two models, each on its own engine, one after the other:

* ``compute``: a randomly initialised Qwen2 model large enough that compute, not per-call
  overhead, dominates on CPU (hidden 512, 8 layers, ~25M parameters). Every path is decoded to
  its budget (``ignore_eos``), so both methods produce exactly the same trajectory lengths and the
  throughput ratio is clean. This is where the speed ratios come from.
* ``toy``: the trained toy model on the built-in task, natural lengths (EOS ends a path), for the
  leaves' reward under both methods (its throughput ratio is reported too, but there per-call
  overhead dominates).

TreePO trees (branching 2; several segment lengths and depths; fixed and random initial
divergence) are compared against independent sampling: one ``n = 16`` request per prompt, all
prompts in one ``LLM.generate`` call. Every repeat runs the independent baseline and then each
tree configuration, so drift affects all alike; per configuration the median over repeats counts.

    python -m bench.tree_vs_independent [--quick]
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, parser, ratio, write_result
from pipeline.config import TreeConfig
from pipeline.sampling import TreeSampler
from pipeline.tasks import ArithTask, arith_reward

WIDTH = 16


@dataclass(frozen=True)
class TreeShape:
    name: str
    segment: int
    depth: int
    divergence: int | tuple[int, int]

    def config(self, eos: int | None, budget: int, answer_stop: bool = True) -> TreeConfig:
        rng = self.divergence if isinstance(self.divergence, tuple) else None
        return TreeConfig(
            width=WIDTH,
            segment_tokens=self.segment,
            max_depth=self.depth,
            branching=2,
            initial_divergence=self.divergence if isinstance(self.divergence, int) else 2,
            initial_divergence_range=rng,
            max_response_tokens=budget,
            eos_token_id=eos,
            repetition_ngram=0,
            answer_stop="boxed" if answer_stop else "none",
        )


def shapes(budget: int, quick: bool) -> list[TreeShape]:
    """Configurations that reach 16 leaves within ``budget`` tokens (b=2 needs depth >= 4 from a
    root fan-out of 2)."""
    if quick:
        return [TreeShape(f"seg{budget // 4}-d4-div2", budget // 4, 4, 2)]
    s = budget
    return [
        TreeShape(f"seg{s // 8}-d8-div2", s // 8, 8, 2),
        TreeShape(f"seg{s // 4}-d4-div2", s // 4, 4, 2),
        TreeShape(f"seg{s // 4}-d4-div4", s // 4, 4, 4),
        TreeShape(f"seg{s // 4}-d4-div8", s // 4, 4, 8),
        TreeShape(f"seg{s // 4}-d4-div2to8", s // 4, 4, (2, 8)),
    ]


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


class Counting:
    """Wraps the engine: sums every call's CallStats."""

    def __init__(self, gen: Any) -> None:
        self.gen = gen
        self.calls = 0
        self.prefill = self.cached = self.decoded = 0

    async def generate(self, requests: list[Any]) -> list[Any]:
        out = await self.gen.generate(requests)
        s = self.gen.last_call
        self.calls += 1
        self.prefill += s.prefill_tokens
        self.cached += s.cached_tokens
        self.decoded += s.decoded_tokens
        return out


def row(
    kind: str,
    name: str,
    seconds: float,
    leaves: int,
    prefill: int,
    cached: int,
    decoded: int,
    calls: int,
    rewards: list[float],
    fallbacks: float = 0.0,
) -> dict[str, Any]:
    return {
        "method": kind,
        "config": name,
        "seconds": seconds,
        "trajectories": leaves,
        "trajectories_per_second": leaves / seconds,
        "decoded_tokens": decoded,
        "prefill_tokens": prefill,
        "cached_prefill_tokens": cached,
        "prefix_cache_hit_rate": ratio(cached, prefill),
        "processed_tokens_per_second": (prefill - cached + decoded) / seconds,
        "engine_calls": calls,
        "fallbacks_per_tree": fallbacks,
        "reward_mean": statistics.fmean(rewards) if rewards else 0.0,
    }


def run_tree(
    gen: Any,
    shape: TreeShape,
    prompts: list[list[int]],
    answers: list[str],
    budget: int,
    eos: int | None,
    decode: Any,
    seed: int,
) -> dict[str, Any]:
    counting = Counting(gen)
    # forced lengths (ignore_eos) leave nothing to stop on: same lengths as the baseline
    cfg = shape.config(eos, budget, answer_stop=not gen.options.ignore_eos)
    sampler = TreeSampler(counting, cfg, rng=seed, decode=decode)
    gen.llm.reset_prefix_cache()
    started = time.perf_counter()
    trees = asyncio.run(sampler.expand(prompts))
    seconds = time.perf_counter() - started
    rewards = [
        arith_reward(decode(tree.response_tokens(leaf.node).tolist()), ans)
        for tree, ans in zip(trees, answers)
        for leaf in tree.leaves
    ]
    leaves = sum(len(t.leaves) for t in trees)
    return row(
        "tree",
        shape.name,
        seconds,
        leaves,
        counting.prefill,
        counting.cached,
        counting.decoded,
        counting.calls,
        rewards,
        sum(t.stats.fallbacks for t in trees) / len(trees),
    )


def run_independent(
    gen: Any, prompts: list[list[int]], answers: list[str], budget: int, decode: Any, seed: int
) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        n=WIDTH,
        temperature=1.0,
        max_tokens=budget,
        logprobs=0,
        ignore_eos=gen.options.ignore_eos,
        seed=seed,
    )
    gen.llm.reset_prefix_cache()
    started = time.perf_counter()
    outs = gen.llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
    )
    seconds = time.perf_counter() - started
    prefill = sum(len(p) for p in prompts)
    cached = sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs)
    decoded = sum(len(c.token_ids) for o in outs for c in o.outputs)
    rewards = [
        arith_reward(decode(list(c.token_ids)), ans)
        for o, ans in zip(outs, answers)
        for c in o.outputs
    ]
    leaves = sum(len(o.outputs) for o in outs)
    return row("independent", f"n{WIDTH}", seconds, leaves, prefill, cached, decoded, 1, rewards)


def measure(
    model: Path, prompts_n: int, budget: int, repeats: int, quick: bool, forced: bool
) -> dict[str, Any]:
    from workers.engine import EngineOptions, VLLMSegmentGenerator

    gen = VLLMSegmentGenerator(
        EngineOptions(
            model=str(model),
            dtype="float32",
            ignore_eos=forced,
            kv_cache_gib=2,
            extra={"max_num_seqs": 256},
        )
    )
    try:
        tok = gen.llm.get_tokenizer()
        problems = ArithTask().problems("heldout", prompts_n, seed=7)
        prompts = [list(tok(p.prompt)["input_ids"]) for p in problems]
        answers = [p.answer for p in problems]

        def decode(ids: list[int]) -> str:
            return str(tok.decode(ids, skip_special_tokens=True))

        eos = None if forced else gen.eos_token_id
        rows: list[dict[str, Any]] = []
        # one untimed pass of each method warms the engine (first calls compile and allocate)
        run_independent(gen, prompts[:2], answers[:2], budget, decode, seed=0)
        for shape in shapes(budget, quick)[:1]:
            run_tree(gen, shape, prompts[:2], answers[:2], budget, eos, decode, seed=0)
        for r in range(repeats):
            rows.append({"repeat": r, **run_independent(gen, prompts, answers, budget, decode, r)})
            print(rows[-1], flush=True)
            for shape in shapes(budget, quick):
                rows.append(
                    {"repeat": r, **run_tree(gen, shape, prompts, answers, budget, eos, decode, r)}
                )
                print(rows[-1], flush=True)
    finally:
        gen.close()
    return summarize(rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats per configuration, and each tree configuration against the
    independent baseline of the same repeats."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    med = {
        name: {
            **{k: v for k, v in rs[0].items() if k in ("method", "config")},
            **{
                k: statistics.median(r[k] for r in rs)
                for k in rs[0]
                if isinstance(rs[0][k], (int, float)) and k != "repeat"
            },
        }
        for name, rs in by.items()
    }
    base = med.pop(f"n{WIDTH}")
    configs = []
    for m in med.values():
        configs.append(
            {
                **m,
                "trajectories_per_second_ratio": ratio(
                    m["trajectories_per_second"], base["trajectories_per_second"]
                ),
                "processed_tokens_per_second_ratio": ratio(
                    m["processed_tokens_per_second"], base["processed_tokens_per_second"]
                ),
                "decoded_tokens_ratio": ratio(m["decoded_tokens"], base["decoded_tokens"]),
                "reward_difference": m["reward_mean"] - base["reward_mean"],
            }
        )
    best = max(configs, key=lambda c: c["trajectories_per_second_ratio"])
    return {"independent": base, "trees": configs, "best": best["config"], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=None, help="prompts per batch (16; 2 quick)")
    p.add_argument("--budget", type=int, default=None, help="tokens per trajectory (128; 16 quick)")
    p.add_argument("--repeats", type=int, default=None, help="repeats (3; 1 quick)")
    args = p.parse_args(argv)
    prompts = args.prompts or (2 if args.quick else 16)
    budget = args.budget or (16 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    cache = ROOT / ".cache" / ("bench-compute-quick" if args.quick else "bench-compute")
    compute = measure(
        build_compute_model(cache, args.quick), prompts, budget, repeats, args.quick, forced=True
    )
    result: dict[str, Any] = {
        "width": WIDTH,
        "branching": 2,
        "prompts": prompts,
        "budget_tokens": budget,
        "repeats": repeats,
        "compute_model": {
            "path": str(cache.relative_to(ROOT)),
            "parameters": _params(cache),
            **compute,
        },
    }
    if not args.quick:
        from toy.kit import build_toy_model

        toy = build_toy_model(ROOT / "runs" / "toy-model", seed=0)
        result["toy_model"] = {
            "parameters": _params(toy),
            **measure(toy, prompts, 48, repeats, False, forced=False),
        }
    best = next(c for c in compute["trees"] if c["config"] == compute["best"])
    result["trajectories_per_second_ratio"] = best["trajectories_per_second_ratio"]
    result["processed_tokens_per_second_ratio"] = best["processed_tokens_per_second_ratio"]
    result["decoded_tokens_ratio"] = best["decoded_tokens_ratio"]
    result["best_configuration"] = compute["best"]
    result["anchor"] = "TreePO paper, H100: about +40% trajectories/s and +30-35% tokens/s"
    write_result("tree_vs_independent", args, result)
    print(
        f"best {compute['best']}: trajectories/s x{result['trajectories_per_second_ratio']:.2f}, "
        f"decoded tokens x{result['decoded_tokens_ratio']:.2f}"
    )
    return 0


def _params(model_dir: Path) -> int | None:
    import json

    meta = model_dir / "toy_meta.json"
    return json.loads(meta.read_text()).get("parameters") if meta.is_file() else None


if __name__ == "__main__":
    raise SystemExit(main())
