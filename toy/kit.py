"""Toy model kit: a tiny Qwen2-architecture LM and tokenizer for the built-in ``arith`` task.

``build_toy_model(out_dir, seed)`` builds, with no network, a symbol-level tokenizer
(``tokenizers``), a small Qwen2 causal LM, and warm-starts it with supervised training on the
task's train split in two phases:

1. worked solutions only (``12+34=46;46+7=53;\\boxed{53}``) until held-out greedy accuracy
   reaches ``worked_target`` (0.4: the model can add step by step, not reliably), at most
   ``worked_steps`` steps;
2. ``mix_steps`` more steps where a ``direct_fraction`` of the examples answer at once
   (``\\boxed{53}``), a habit of guessing that is usually wrong for a model this small. The model
   kept is the phase-2 state, among those evaluated, whose held-out accuracy is nearest
   ``start_accuracy`` (0.2).

The start is therefore neither hopeless nor solved, and reward has two things to teach: to
prefer working the sum out over guessing, and to add more reliably. The kit saves a normal
Hugging Face model directory that vLLM and transformers both load. A finished directory is
reused (``toy_meta.json`` records the seed, spec and kit version), so a second call is instant.

Why targets and not a fixed schedule (kit 3): learning to add comes late and suddenly here
(accuracy ~0.05 for a thousand steps, then 0.1 -> 0.6 within 300), and *when* moved by 600 steps
between two package sets, so a fixed step count started the demo at 0.17 on one and 0.02 on
the other. Phase 2's greedy accuracy swings between evaluations (the guess-or-work habit flips),
so a fixed end is a lottery as well; choosing among the evaluated states is not. The build is
reproducible on one package set: two compute threads whatever the machine has, deterministic
kernels, and the same evaluations decide; ``toy_meta.json`` records the steps taken, the
accuracy reached and the weights' sha256 (a test builds twice and compares).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.fsutil import staged_dir
from pipeline.treepo.tasks import BOX_OPEN, ArithTask

log = logging.getLogger(__name__)

KIT_VERSION = 4
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
    worked_target: float = 0.4
    """Phase 1 ends at the first evaluation with at least this held-out greedy accuracy."""
    worked_steps: int = 4000
    """At most this many phase-1 steps (a warning if ``worked_target`` was not reached)."""
    mix_steps: int = 300
    """Phase 2 steps, where ``direct_fraction`` of the examples answer without working."""
    direct_fraction: float = 0.5
    start_accuracy: float = 0.2
    """The phase-2 state kept is the evaluated one whose accuracy is nearest this."""
    eval_every: int = 50
    """Held-out evaluations (and progress lines) every this many steps."""
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

    from pipeline.treepo.tasks import reward_fn

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


def _progress(
    spec: ToySpec, phase: int, step: int, loss: float, acc: float, elapsed: float
) -> None:
    budget = spec.worked_steps if phase == 1 else spec.mix_steps
    log.info(
        "toy warm-up phase %d step %d (of at most %d): loss %.3f held-out accuracy %.3f; %.0f s "
        "so far",
        phase,
        step,
        budget,
        loss,
        acc,
        elapsed,
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
        "toy model ready in %s: %d + %d warm-up steps, accuracy %.3f, weights sha256 %s",
        out,
        meta["worked_solution_steps"],
        meta["mix_steps_kept"],
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
    w = _Warmup(spec, seed, started)
    phase1, reached = w.phase_one()
    kept, result = w.phase_two(reached)
    return (
        w.model,
        w.tokenizer,
        {
            "steps": phase1 + spec.mix_steps,
            "worked_solution_steps": phase1,
            "worked_solution_accuracy": reached["accuracy"],
            "mix_steps_kept": kept,
            "heldout_greedy_accuracy": result["accuracy"],
            "heldout_worked_fraction": result["worked_fraction"],
            "seconds": round(time.monotonic() - started, 1),
            "parameters": sum(p.numel() for p in w.model.parameters()),
        },
    )


class _Warmup:
    """The model, its optimizer and the held-out problems of one build."""

    def __init__(self, spec: ToySpec, seed: int, started: float) -> None:
        import torch

        torch.manual_seed(seed)
        self.spec, self.seed, self.started = spec, seed, started
        self.task = ArithTask()
        self.tokenizer = build_tokenizer()
        self.model = make_model(spec)
        self.heldout = self.task.problems("heldout", spec.eval_problems, seed=seed + 1)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, weight_decay=0.0)

    def train_step(self, batch) -> float:  # type: ignore[no-untyped-def]
        ids, labels, mask = batch
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.item())

    def evaluate(self, phase: int, step: int, loss: float) -> dict[str, float]:
        result = greedy_eval(self.model, self.tokenizer, self.heldout)
        elapsed = time.monotonic() - self.started
        _progress(self.spec, phase, step, loss, result["accuracy"], elapsed)
        return result

    def phase_one(self) -> tuple[int, dict[str, float]]:
        """Worked solutions until the held-out target (or the step budget); returns the steps
        taken and the last evaluation."""
        spec = self.spec
        worked = _batches(self.task, self.tokenizer, spec, self.seed, 0.0)
        step, result, reached = 0, {"accuracy": 0.0, "worked_fraction": 0.0}, False
        while step < spec.worked_steps and not reached:
            step += 1
            loss = self.train_step(next(worked))
            if step % spec.eval_every == 0 or step == spec.worked_steps:
                result = self.evaluate(1, step, loss)
                reached = result["accuracy"] >= spec.worked_target
        if not reached:
            log.warning(
                "toy warm-up: held-out accuracy %.3f after %d worked-solution steps, short of "
                "%.2f; going on (the demo may start weaker than documented)",
                result["accuracy"],
                step,
                spec.worked_target,
            )
        return step, result

    def phase_two(self, start: dict[str, float]) -> tuple[int, dict[str, float]]:
        """The mixed steps; loads the evaluated state nearest ``start_accuracy`` (phase 1's end
        when there are no mixed steps) and returns its step and evaluation."""
        spec = self.spec

        def snapshot() -> dict[str, Any]:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

        kept = (0, start, snapshot())
        mixed = _batches(self.task, self.tokenizer, spec, self.seed + 1, spec.direct_fraction)
        for step in range(1, spec.mix_steps + 1):
            loss = self.train_step(next(mixed))
            if step % spec.eval_every == 0 or step == spec.mix_steps:
                result = self.evaluate(2, step, loss)
                nearest = abs(result["accuracy"] - spec.start_accuracy)
                if kept[0] == 0 or nearest < abs(kept[1]["accuracy"] - spec.start_accuracy):
                    kept = (step, result, snapshot())
        self.model.load_state_dict(kept[2])
        return kept[0], kept[1]
