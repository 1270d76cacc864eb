"""Toy model kit: a tiny Qwen2-architecture LM and tokenizer for the built-in ``arith`` task.

``build_toy_model(out_dir, seed)`` builds, with no network, a symbol-level tokenizer
(``tokenizers``), a small Qwen2 causal LM, and warm-starts it with supervised training on the
task's train split in two phases:

1. worked solutions only (``12+34=46;46+7=53;\\boxed{53}``) until greedy held-out accuracy first
   reaches ``target_accuracy``, so the model can add step by step, but not reliably;
2. ``mix_steps`` more steps where a ``direct_fraction`` of the examples answer at once
   (``\\boxed{53}``), a habit of guessing that is usually wrong for a model this small.

The start is therefore neither hopeless nor solved, and reward has two things to teach: to
prefer working the sum out over guessing, and to add more reliably. The kit saves a normal
Hugging Face model directory that vLLM and transformers both load. A finished directory is
reused (``toy_meta.json`` records the seed, spec and kit version), so a second call is instant.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.fsutil import staged_dir
from pipeline.tasks import BOX_OPEN, ArithTask

log = logging.getLogger(__name__)

KIT_VERSION = 2
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
    target_accuracy: float = 0.25
    """Phase 1 (worked solutions) ends once greedy held-out accuracy reaches this."""
    mix_steps: int = 300
    """Phase 2 steps, where ``direct_fraction`` of the examples answer without working."""
    direct_fraction: float = 0.5
    eval_every: int = 50
    eval_problems: int = 200
    max_steps: int = 3000


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
    left = elapsed / step * (spec.max_steps - step + spec.mix_steps)
    log.info(
        "toy warm-up step %d of at most %d (ends at held-out accuracy %.2f): loss %.3f "
        "accuracy %.3f; %.0f s so far, at most %.0f s to go",
        step,
        spec.max_steps,
        spec.target_accuracy,
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

    acc, step = 0.0, 0
    for step, batch in enumerate(_batches(task, tokenizer, spec, seed, 0.0), start=1):
        loss = train_step(batch)
        if step % spec.eval_every == 0:
            acc = greedy_eval(model, tokenizer, heldout)["accuracy"]
            _progress(spec, step, loss, acc, time.monotonic() - started)
            if acc >= spec.target_accuracy or step >= spec.max_steps:
                break
    worked_steps = step
    mixed = _batches(task, tokenizer, spec, seed + 1, spec.direct_fraction)
    for _ in range(spec.mix_steps):
        loss = train_step(next(mixed))
        step += 1
    if spec.mix_steps:
        acc = greedy_eval(model, tokenizer, heldout)["accuracy"]
        log.info("toy warm-up mixed phase done: loss %.3f held-out greedy accuracy %.3f", loss, acc)
    meta = {
        **want,
        "steps": step,
        "worked_solution_steps": worked_steps,
        "heldout_greedy_accuracy": acc,
        "seconds": round(time.monotonic() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_model(model, tokenizer, out, meta)
    log.info("toy model ready in %s: %d warm-up steps, accuracy %.3f", out, step, acc)
    return out
