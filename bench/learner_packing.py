"""Tree-packed vs per-leaf learner: the same batches of trees through both paths, in one run.

Trees are grown by the real tree sampler (``pipeline.treepo.sampling.TreeSampler``) with the scripted
generator of the tests (token ids folded into the model's vocabulary), so their shapes are the
algorithm's: early stops, fallback and branching included. Two settings:

* ``toy``: the toy model with the demo's tree shape (width 8, 8-token segments, depth 6,
  root fan-out 4, EOS stops), 8 trees per batch;
* ``compute``: the random 25M-parameter Qwen2 model of ``bench/tree_vs_independent.py`` with its
  tree shapes (16 leaves, branching 2, every path decoded to 128 tokens), 4 trees per batch.

Per batch and path: the forward + backward of a per-leaf loss (each leaf's log-probs times its
advantage; the TreePO loss has this form) in one process, repeats alternating the paths (best
of the repeats counts); token positions computed, padding fraction of the per-leaf rows, the
sharing factor (per-leaf real tokens / packed real tokens), the largest log-prob difference
between the paths, and the peak resident memory of a fresh process that loads the model and runs
one forward + backward on each path (peak reset after the model is loaded, `VmHWM`).

    python -m bench.learner_packing [--quick]
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, parser, ratio, reset_peak_rss, status_kib, write_result
from pipeline.config import TreeConfig
from pipeline.treepo.sampling import TreeSampler
from pipeline.wire.messages import TreeRollout

TREES = {"toy": 8, "compute": 4}
"""Trees per batch: the demo's 8 on the toy model; 4 of 16 x 128 tokens on the 25M model."""


def grow(config: TreeConfig, vocab: int, prompts: int, seed: int, eos_p: float) -> list[Any]:
    from tests.scripted import EOS, ScriptedGenerator, decode

    gen = ScriptedGenerator(seed=seed, eos_p=eos_p, answer_p=0.0)
    rng = random.Random(seed)
    prompt_ids = [[rng.randrange(1, vocab) for _ in range(20)] for _ in range(prompts)]
    cfg = config.model_copy(update={"eos_token_id": EOS if eos_p else None, "answer_stop": "none"})
    trees = asyncio.run(TreeSampler(gen, cfg, rng=seed, decode=decode).expand(prompt_ids))
    for tree in trees:
        for node in tree.nodes:
            node.token_ids = node.token_ids % vocab
        for leaf in tree.leaves:
            leaf.reward = float(rng.choice([-1.0, 1.0]))
    return trees


def settings(quick: bool) -> list[tuple[str, str, TreeConfig, float]]:
    """(model, shape name, tree config, EOS probability per segment)."""
    demo = TreeConfig(
        width=8, segment_tokens=8, max_depth=6, branching=2, initial_divergence=4,
        max_response_tokens=48,
    )  # fmt: skip
    out = [("toy", "demo-w8-seg8-d6-div4", demo, 0.15)]
    budget = 16 if quick else 128
    shapes = [(budget // 4, 4, 2)] if quick else [
        (budget // 8, 8, 2), (budget // 4, 4, 2), (budget // 4, 4, 4), (budget // 4, 4, 8),
    ]  # fmt: skip
    for seg, depth, div in shapes:
        cfg = TreeConfig(
            width=16, segment_tokens=seg, max_depth=depth, branching=2, initial_divergence=div,
            max_response_tokens=budget, repetition_ngram=0,
        )  # fmt: skip
        out.append(("compute", f"seg{seg}-d{depth}-div{div}", cfg, 0.0))
    return out


def load(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    ).train()


def leaf_loss(model: Any, trees: list[TreeRollout], path: str, row_tokens: int) -> tuple[Any, Any]:
    """(loss, per-leaf log-probs) of one path: sum over leaves of advantage x log-probs."""
    from learner.batch import build_batch
    from learner.packing import leaf_logprobs
    from learner.trainer import token_logprobs

    if path == "tree":
        per_leaf = [lp for leaves in leaf_logprobs(model, trees, row_tokens) for lp in leaves]
    else:
        b = build_batch(trees)
        lp = token_logprobs(model, b.input_ids, b.attention_mask, b.temperatures)
        per_leaf = [lp[r][b.mask[r] == 1] for r in range(b.rows)]
    rewards = [leaf.reward for t in trees for leaf in t.leaves]
    loss = sum(-r * lp.sum() for r, lp in zip(rewards, per_leaf))
    return loss, per_leaf


def step(model: Any, trees: list[TreeRollout], path: str, row_tokens: int) -> float:
    model.zero_grad()
    started = time.perf_counter()
    loss, _ = leaf_loss(model, trees, path, row_tokens)
    loss.backward()
    return time.perf_counter() - started


def counts(trees: list[TreeRollout], row_tokens: int) -> dict[str, float]:
    from learner.batch import build_batch
    from learner.packing import pack

    b = build_batch(trees)
    p = pack(trees, row_tokens=row_tokens)
    real = float(b.attention_mask.sum())
    return {
        "leaves": b.rows,
        "per_leaf_positions": b.input_ids.numel(),
        "per_leaf_real_tokens": real,
        "per_leaf_padding_fraction": 1 - real / b.input_ids.numel(),
        "packed_positions": p.input_ids.numel(),
        "packed_real_tokens": p.tokens,
        "packed_rows": p.input_ids.shape[0],
        "sharing_factor": real / p.tokens,
    }


def child(model_dir: str, trees_file: str, path: str, row_tokens: int) -> None:
    """One forward + backward in a fresh process; prints its peak resident memory."""
    from pipeline.wire.messages import decode_as

    raw = Path(trees_file).read_bytes()
    trees, i = [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i : i + 8], "little")
        trees.append(decode_as(raw[i + 8 : i + 8 + n], TreeRollout))
        i += 8 + n
    model = load(Path(model_dir))
    gc.collect()
    base = reset_peak_rss()
    step(model, trees, path, row_tokens)
    peak = status_kib("VmHWM")
    print(json.dumps({"peak_rss_mib": peak / 1024, "step_rss_increase_mib": (peak - base) / 1024}))


def peak_memory(
    model_dir: Path, trees: list[TreeRollout], path: str, rows: int
) -> dict[str, float]:
    from pipeline.wire.messages import encode

    blob = Path(ROOT / ".cache" / "packing-trees.bin")
    blob.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(len(e).to_bytes(8, "little") + e for e in map(encode, trees))
    blob.write_bytes(data)
    args = [sys.executable, "-m", "bench.learner_packing", "--child", str(model_dir), str(blob)]
    out = subprocess.run([*args, path, str(rows)], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(
    name: str, shape: str, model_dir: Path, trees: list[TreeRollout], repeats: int, rows: int
) -> dict[str, Any]:
    import torch

    model = load(model_dir)
    with torch.no_grad():
        _, want = leaf_loss(model, trees, "leaf", rows)
        _, got = leaf_loss(model, trees, "tree", rows)
    diff = max(float((w - g).abs().max()) for w, g in zip(want, got) if len(w))
    seconds: dict[str, list[float]] = {"leaf": [], "tree": []}
    step(model, trees, "tree", rows)  # warm-up
    for _ in range(repeats):
        for path in ("leaf", "tree"):
            seconds[path].append(step(model, trees, path, rows))
    leaf_s, tree_s = min(seconds["leaf"]), min(seconds["tree"])
    row = {
        "model": name,
        "shape": shape,
        **counts(trees, rows),
        "per_leaf_seconds": leaf_s,
        "packed_seconds": tree_s,
        "step_time_ratio": ratio(leaf_s, tree_s),
        "max_abs_logprob_diff": diff,
        "per_leaf_memory": peak_memory(model_dir, trees, "leaf", rows),
        "packed_memory": peak_memory(model_dir, trees, "tree", rows),
    }
    print(
        f"{name:8s} {shape:22s} sharing {row['sharing_factor']:.2f} step x{row['step_time_ratio']:.2f} "
        f"({leaf_s:.3f}s -> {tree_s:.3f}s) diff {diff:.1e}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5], int(sys.argv[5]))
        return 0
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats (3; 1 quick)")
    p.add_argument("--row-tokens", type=int, default=0, help="packed row budget (0: a tree a row)")
    p.add_argument("--model", type=Path, default=None, help="toy model directory (built if absent)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    from bench.tree_vs_independent import build_compute_model
    from toy.kit import build_toy_model

    cache = ROOT / ".cache" / ("bench-compute-quick" if args.quick else "bench-compute")
    models = {
        "compute": build_compute_model(cache, args.quick),
        "toy": args.model or build_toy_model(ROOT / "runs" / "toy-model", seed=0),
    }
    vocab = {
        k: json.loads((v / "config.json").read_text())["vocab_size"] for k, v in models.items()
    }
    rows = []
    for name, shape, cfg, eos_p in settings(args.quick):
        trees = grow(cfg, vocab[name], 2 if args.quick else TREES[name], len(rows), eos_p)
        rows.append(measure(name, shape, models[name], trees, repeats, args.row_tokens))
    compute = [r for r in rows if r["model"] == "compute"]
    best = max(compute, key=lambda r: r["step_time_ratio"])
    result = {
        "trees_per_batch": TREES,
        "row_tokens": args.row_tokens,
        "repeats": repeats,
        "rows": rows,
        "best_shape": best["shape"],
        "sharing_factor": best["sharing_factor"],
        "step_time_ratio": best["step_time_ratio"],
        "step_time_vs_sharing": ratio(best["step_time_ratio"], best["sharing_factor"]),
        "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in rows),
        "note": (
            "forward + backward of a per-leaf loss, best of alternating repeats, CPU fp32 with "
            "SDPA and a dense 4-D mask (attention inside a packed row is computed for every "
            "pair, masked); memory: a fresh process per path, peak RSS of the forward + backward "
            "above the loaded model's"
        ),
    }
    write_result("learner_packing", args, result)
    print(
        f"best {best['shape']}: sharing {result['sharing_factor']:.2f}, step x"
        f"{result['step_time_ratio']:.2f}, max |diff| {result['max_abs_logprob_diff']:.1e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
