"""Toy model kit: a tiny Qwen2-architecture LM and tokenizer for the built-in ``arith`` task.

``build_toy_model(out_dir, seed)`` builds, with no network, a symbol-level tokenizer
(``tokenizers``), a small Qwen2 causal LM, and warm-starts it with supervised training on the
task's train split in two phases:

1. ``worked_steps`` steps of worked solutions only (``12+34=46;46+7=53;\\boxed{53}``), so the
   model can add step by step, but not reliably (about a quarter of held-out problems right);
2. ``mix_steps`` more steps where a ``direct_fraction`` of the examples answer at once
   (``\\boxed{53}``), a habit of guessing that is usually wrong for a model this small.

The start is therefore neither hopeless nor solved, and reward has two things to teach: to
prefer working the sum out over guessing, and to add more reliably. The kit saves a normal
Hugging Face model directory that vLLM and transformers both load. A finished directory is
reused (``toy_meta.json`` records the seed, spec and kit version), so a second call is instant.

The build is reproducible: a fixed schedule (kit 2 stopped phase 1 at the first evaluation
reaching an accuracy, so a tiny numeric difference between machines could add or drop 50 steps
and change the model's accuracy from 0.17 to 0.30), two compute threads whatever the machine
has, and deterministic kernels. ``toy_meta.json`` records the weights' sha256: the same package
versions on the same CPU family give the same bytes (a test builds twice and compares).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.fsutil import staged_dir
from pipeline.tasks import BOX_OPEN, ArithTask

log = logging.getLogger(__name__)

KIT_VERSION = 3
BUILD_THREADS = 2
"""Compute threads of a build, whatever the machine has (reductions split by thread count)."""
SPECIALS = ["<pad>", "<eos>", "<unk>"]
SYMBOLS = [*"0123456789+=;", "\\boxed{", "}"]
PAD_ID, EOS_ID = 0, 1


@dataclass(frozen=True)
class ToySpec:
    """Model size and warm-up budget of the toy kit."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_positions: int = 128
    vocab: int = 32
    batch: int = 64
    lr: float = 2e-3
    worked_steps: int = 950
    """Phase 1 steps (worked solutions only): where held-out greedy accuracy first reached 0.25
    on the reference machine with kit 2, now a fixed schedule."""
    mix_steps: int = 300
    """Phase 2 steps, where ``direct_fraction`` of the examples answer without working."""
    direct_fraction: float = 0.5
    eval_every: int = 50
    """Progress lines (with held-out accuracy) every this many steps."""
    eval_problems: int = 200


def build_tokenizer():  # type: ignore[no-untyped-def]
    """A tokenizer whose tokens are single symbols, plus ``\\boxed{`` as one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def make_model(spec: ToySpec):  # type: ignore[no-untyped-def]
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        bos_token_id=EOS_ID,
        torch_dtype="float32",
    )
    return Qwen2ForCausalLM(config)


def save_model(model, tokenizer, out: Path, meta: dict) -> Path:  # type: ignore[no-untyped-def]
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory, whole or not at all."""
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "toy_meta.json").write_text(json.dumps(meta, indent=2))
    return out


def shows_work(response: str) -> bool:
    """Whether ``response`` writes at least one step (an ``=``) before its boxed answer."""
    return "=" in response.split(BOX_OPEN, 1)[0]


def greedy_eval(model, tokenizer, problems, max_new_tokens: int = 48) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Greedy completions of ``problems``: ``accuracy`` (the task's checker accepts the answer)
    and ``worked_fraction`` (the response shows at least one step before its answer)."""
    import torch

    from pipeline.tasks import reward_fn

    model.eval()
    enc = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train()
    good = sum(reward_fn(p.task)(t, p.answer) > 0 for p, t in zip(problems, texts))
    worked = sum(shows_work(t) for t in texts)
    return {"accuracy": good / len(problems), "worked_fraction": worked / len(problems)}


def _batches(task: ArithTask, tokenizer, spec: ToySpec, seed: int, direct_fraction: float):  # type: ignore[no-untyped-def]
    import random

    import torch

    it = task.sample("train", seed)
    rng = random.Random(f"toy-direct-{seed}")
    while True:
        ops = [next(it) for _ in range(spec.batch)]
        prompts = [tokenizer(task.problem(o).prompt)["input_ids"] for o in ops]
        texts = [
            f"{BOX_OPEN}{sum(o)}}}" if rng.random() < direct_fraction else task.solution(o)
            for o in ops
        ]
        answers = [tokenizer(t)["input_ids"] + [EOS_ID] for t in texts]
        length = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((spec.batch, length), PAD_ID, device="cpu")
        labels = torch.full((spec.batch, length), -100, device="cpu")
        for i, (p, a) in enumerate(zip(prompts, answers)):
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq, device="cpu")
            labels[i, len(p) : len(seq)] = torch.tensor(a, device="cpu")
        yield ids, labels, (ids != PAD_ID).long()


def _progress(spec: ToySpec, step: int, loss: float, acc: float, elapsed: float) -> None:
    total = spec.worked_steps + spec.mix_steps
    left = elapsed / step * (total - step)
    log.info(
        "toy warm-up step %d of %d: loss %.3f held-out accuracy %.3f; %.0f s so far, about %.0f s "
        "to go",
        step,
        total,
        loss,
        acc,
        elapsed,
        left,
    )


def build_toy_model(out_dir: str | Path, seed: int = 0, spec: ToySpec | None = None) -> Path:
    """Build (or reuse) the toy model directory; returns its path."""
    import torch

    spec = spec or ToySpec()
    out = Path(out_dir)
    meta_path = out / "toy_meta.json"
    want = {"kit_version": KIT_VERSION, "seed": seed, "spec": asdict(spec)}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} == want:
            return out
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        model, tokenizer, meta = _train(spec, seed, started)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    meta = {**want, **meta}
    save_model(model, tokenizer, out, meta)
    meta["weights_sha256"] = sha256_of(out / "model.safetensors")
    (out / "toy_meta.json").write_text(json.dumps(meta, indent=2))
    log.info(
        "toy model ready in %s: %d warm-up steps, accuracy %.3f, weights sha256 %s",
        out,
        meta["steps"],
        meta["heldout_greedy_accuracy"],
        meta["weights_sha256"][:16],
    )
    return out


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _train(spec: ToySpec, seed: int, started: float) -> tuple[Any, Any, dict[str, Any]]:
    """The two warm-up phases; returns the model, the tokenizer and the build's record."""
    import torch

    torch.manual_seed(seed)
    task = ArithTask()
    tokenizer = build_tokenizer()
    model = make_model(spec)
    heldout = task.problems("heldout", spec.eval_problems, seed=seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)

    def train_step(batch) -> float:  # type: ignore[no-untyped-def]
        ids, labels, mask = batch
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.item())

    acc, loss, step = 0.0, 0.0, 0
    worked = _batches(task, tokenizer, spec, seed, 0.0)
    mixed = _batches(task, tokenizer, spec, seed + 1, spec.direct_fraction)
    for step in range(1, spec.worked_steps + spec.mix_steps + 1):
        loss = train_step(next(worked if step <= spec.worked_steps else mixed))
        if step % spec.eval_every == 0:
            acc = greedy_eval(model, tokenizer, heldout)["accuracy"]
            _progress(spec, step, loss, acc, time.monotonic() - started)
    acc = greedy_eval(model, tokenizer, heldout)["accuracy"]
    return (
        model,
        tokenizer,
        {
            "steps": step,
            "worked_solution_steps": spec.worked_steps,
            "heldout_greedy_accuracy": acc,
            "seconds": round(time.monotonic() - started, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    )
