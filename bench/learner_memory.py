"""Peak memory of one learner step against the packed tokens of a tree.

A model with Qwen's 151,936-token vocabulary and a tiny body (hidden 64, 2 layers: the head
dominates, as it does at scale) runs one step on a single 16-leaf tree (a full binary tree of
depth 5 under a 64-token prompt) of 1k to 16k packed tokens: the proximal pass (no gradient)
and a forward + backward of a per-leaf loss, both through ``learner.packing.leaf_logprobs``,
the learner's own code path. Two heads side by side, each size in a fresh process (peak resident
memory above the memory after the model and tree are built, ``VmHWM`` reset):

* ``chunked``: today's head, chunks whose logits are recomputed in backward
  (``learner.logprobs``);
* ``kept``: the head as it was before, chunks of 4,096 tokens with autograd keeping every
  chunk's ``[tokens, vocab]`` logits for backward.

The result: MB per 1k packed tokens between 1k and 4k tokens (the slope), per head, and each
size's peak and seconds. ``--device cuda --shape qwen2.5-1.5b`` runs the same step at
Qwen2.5-1.5B's shapes (random weights, bf16, FlexAttention) and reports CUDA peak memory
(``torch.cuda.max_memory_allocated``) and step time; not run on CPU machines.

    python -m bench.learner_memory [--quick] [--device cuda --shape qwen2.5-1.5b]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench.common import ROOT, Progress, parser, reset_peak_rss, status_kib, write_result

SIZES = [1024, 2048, 4096, 8192, 16384]
"""Packed tokens per tree (full mode)."""

SHAPES: dict[str, dict[str, Any]] = {
    "tiny-qwen-vocab": dict(
        vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
    ),
}  # fmt: skip


MODEL_SHAPES = {
    # parameters, hidden, layers, MLP width, KV width (heads x head dim)
    "Qwen2.5-1.5B": (1.54e9, 1536, 28, 8960, 256),
    "Qwen2.5-7B": (7.62e9, 3584, 28, 18944, 512),
}


def predict_gb(
    model: str, tokens: int, ranks: int, zero: int, checkpointing: bool = True, head_mb: int = 512
) -> dict[str, float]:
    """The memory model of one learner rank (GB) for one ``tokens``-token packed micro-batch:
    bf16 weights and gradients with fp32 master weights and Adam moments (16 bytes a parameter
    in all; ZeRO-2 shards the 12 optimizer bytes and the 2 gradient bytes, ZeRO-3 all 16), the
    activations kept for backward (with gradient checkpointing one bf16 ``[T, hidden]`` input
    per layer, plus one layer's recomputed activations: ~10 hidden-wide and 3 MLP-wide bf16
    tensors a token; without it ~34 hidden-wide and 5 MLP-wide tensors per layer), FlexAttention
    (no ``[T, T]`` tensor), and the head: the last hidden state plus one chunk's transient."""
    params, hidden, layers, mlp, kv = MODEL_SHAPES[model]
    states = {2: 2 * params + 14 * params / ranks, 3: 16 * params / ranks}.get(zero, 16 * params)
    if checkpointing:
        acts = layers * 2 * tokens * hidden + tokens * (10 * hidden + 2 * kv + 3 * mlp) * 2
    else:
        acts = layers * tokens * (34 * hidden + 5 * mlp) * 2
    head = tokens * hidden * 2 + head_mb * 2**20
    total = states + acts + head
    return {k: round(v / 1e9, 1) for k, v in
            {"states": states, "activations": acts, "head": head, "total": total}.items()}  # fmt: skip


def table() -> str:
    """The memory model's predictions as a Markdown table (docs/benchmarks.md)."""
    lines = [
        "| model | tokens a micro-batch | ranks | ZeRO | states GB | activations GB | head GB | "
        "total GB | fits 80 GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODEL_SHAPES:
        for tokens in (4096, 8192, 33_000):
            for ranks, zero in ((4, 2), (8, 2), (8, 3)):
                p = predict_gb(model, tokens, ranks, zero)
                lines.append(
                    f"| {model} | {tokens:,} | {ranks} | {zero} | {p['states']} | "
                    f"{p['activations']} | {p['head']} | {p['total']} | "
                    f"{'yes' if p['total'] < 72 else 'no'} |"
                )
    return "\n".join(lines)


def binary_tree(depth: int, node_tokens: int, prompt: int, vocab: int, seed: int) -> Any:
    """A binary tree of ``depth`` levels of ``node_tokens``-token nodes under one root node
    (2^(depth-1) leaves), random tokens below ``vocab`` and leaf rewards of +-1."""
    import random

    from pipeline.wire.messages import RolloutLeaf, TreeRollout

    rng = random.Random(seed)
    t = TreeRollout([rng.randrange(1, vocab) for _ in range(prompt)])
    frontier = [-1]
    for level in range(depth):
        nxt = []
        for parent in frontier:
            for _ in range(1 if level == 0 else 2):
                ids = [rng.randrange(vocab) for _ in range(node_tokens)]
                nxt.append(t.add_node(parent, ids, [-1.0] * node_tokens))
        frontier = nxt
    for node in frontier:
        t.leaves.append(RolloutLeaf(node, float(rng.choice([-1, 1])), "eos"))
    return t


def tree(tokens: int, vocab: int) -> Any:
    """A 16-leaf binary tree (31 nodes, depth 5) of about ``tokens`` packed tokens."""
    return binary_tree(5, max(1, (tokens - 64) // 31), 64, vocab, seed=tokens)


def keep_logits_head() -> None:
    """Swap in the head as it was: autograd keeps each chunk's logits for backward."""
    import torch

    import learner.packing as packing

    def kept(head, hidden, rows, cols, target, temperature, chunk, chunks=None):  # type: ignore[no-untyped-def]
        chunk = 4096  # the old code's chunk
        out = []
        for lo in range(0, len(target), chunk):
            sl = slice(lo, lo + chunk)
            h = hidden[rows[sl].to(hidden.device), cols[sl].to(hidden.device)]
            logits = head(h).float() / temperature[sl].to(hidden.device).unsqueeze(-1)
            t = target[sl].to(hidden.device).unsqueeze(-1)
            out.append(logits.gather(-1, t).squeeze(-1) - torch.logsumexp(logits, dim=-1))
        return torch.cat(out)

    packing.head_logprobs = kept  # type: ignore[assignment]


def child(tokens: int, head: str, shape: str, device: str) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from learner.packing import leaf_logprobs, pack

    cuda = device == "cuda"
    torch.manual_seed(0)
    kernel = "flex_attention" if cuda else "sdpa"
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32_768)
    config._attn_implementation = kernel
    dtype = torch.bfloat16 if cuda else torch.float32
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    if cuda:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    t = tree(tokens, config.vocab_size)
    packed = pack([t]).tokens
    if head == "kept":
        keep_logits_head()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss() / 1024
    started = time.perf_counter()
    with torch.no_grad():  # the proximal pass
        leaf_logprobs(model, [t])
    model.train()
    lps = leaf_logprobs(model, [t])
    loss = sum((lp * t.leaves[i].reward).sum() for i, lp in enumerate(lps[0]))
    loss.backward()  # type: ignore[union-attr]
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = status_kib("VmHWM") / 1024 - base
    return {
        "tokens": packed,
        "head": head,
        "shape": shape,
        "device": device,
        "peak_mb": peak,
        "seconds": time.perf_counter() - started,
    }


def measure(tokens: int, head: str, shape: str, device: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.learner_memory", "--child", str(tokens), "--head", head]
    cmd += ["--shape", shape, "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        return {"tokens": tokens, "head": head, "error": out.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def slope(rows: list[dict[str, Any]], head: str, lo: int, hi: int) -> float | None:
    """MB per 1k packed tokens between the sizes ``lo`` and ``hi`` of ``head`` (a tree packs to
    within a few tokens of the size asked for)."""
    measured = [r for r in rows if r["head"] == head and "peak_mb" in r]
    a = next((r for r in measured if abs(r["tokens"] - lo) < 128), None)
    b = next((r for r in measured if abs(r["tokens"] - hi) < 128), None)
    if a is None or b is None:
        return None
    return float((b["peak_mb"] - a["peak_mb"]) / ((b["tokens"] - a["tokens"]) / 1000))


def main(argv: list[str] | None = None) -> int:
    p = parser("peak memory of one learner step against packed tokens")
    p.add_argument("--child", type=int, default=0, help=argparse_hidden())
    p.add_argument("--head", default="chunked", choices=["chunked", "kept"])
    p.add_argument("--shape", default="tiny-qwen-vocab", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--table", action="store_true", help="print the memory model's table")
    args = p.parse_args(argv)
    if args.table:
        print(table())
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.head, args.shape, args.device)))
        return 0
    if args.device == "cuda":
        sizes, heads = [4096, 8192, 16384, 33_000], ["chunked"]
    else:
        sizes = [1024, 2048] if args.quick else SIZES
        heads = ["chunked", "kept"]
    # the kept head at 16k would need ~38 GB: measured up to 4k, where the slope is taken
    plan = [(n, h) for n in sizes for h in heads if h == "chunked" or n <= 4096]
    progress = Progress(len(plan), "learner_memory")
    rows = []
    for n, h in plan:
        rows.append(measure(n, h, args.shape, args.device))
        progress.step(f"{h} head, {n} tokens: {rows[-1].get('peak_mb', 'failed')} MB")
    hi = 2048 if args.quick else 4096
    data = {
        "shape": args.shape,
        "device": args.device,
        "rows": rows,
        "mb_per_1k_tokens": {h: slope(rows, h, 1024, hi) for h in heads},
        "slope_between": [1024, hi],
    }
    write_result(
        "learner_memory" if args.device == "cpu" else f"learner_memory-{args.shape}", args, data
    )
    print(json.dumps(data["mb_per_1k_tokens"]))
    return 0 if all("peak_mb" in r for r in rows) else 1


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
