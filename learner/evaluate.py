"""Periodic held-out evaluation: greedy accuracy of the published policy on an evaluation split.

Every ``TREEPO_LEARNER__EVAL_EVERY`` steps the learner (rank 0) loads the weights it has just
published (gathered whole, so every ZeRO stage works the same) into a copy of the model (on its
GPU in bf16 when there is one, else on the CPU) and
answers ``eval_size`` problems of the evaluation split greedily, prompts rendered exactly as for
training (prompt template, chat template, system prompt), each scored by its reward function.
The accuracy goes into the step log (``eval_accuracy``) and ``treepo_learner_eval_accuracy``.

The split: ``TREEPO_LEARNER__EVAL_DATASET`` (a JSONL/Parquet file or ``save_to_disk`` directory
with the training dataset's fields), or, for the built-in task, its held-out split (disjoint from
training by construction).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.config import LearnerSettings
from pipeline.errors import ConfigError, DatasetError
from pipeline.tasks import ArithTask, Problem, load_dataset, reward_fn

log = logging.getLogger(__name__)


def eval_problems(settings: LearnerSettings) -> list[Problem]:
    """The evaluation split (empty when evaluation is off); a bad file is a ``ConfigError``."""
    opts = settings.learner
    if not opts.eval_every:
        return []
    if opts.eval_dataset:
        try:
            problems = load_dataset(
                opts.eval_dataset, opts.prompt_field, opts.answer_field, opts.task
            )
        except DatasetError as exc:
            raise ConfigError(f"TREEPO_LEARNER__EVAL_DATASET: {exc}") from None
        return problems[: opts.eval_size]
    if opts.dataset == "arith":
        return ArithTask().problems("heldout", opts.eval_size, seed=settings.run.seed + 1)
    raise ConfigError(
        "TREEPO_LEARNER__EVAL_EVERY needs TREEPO_LEARNER__EVAL_DATASET for a file dataset"
    )


class Evaluator:
    """Greedy evaluation of published weight versions on a fixed list of problems."""

    def __init__(self, settings: LearnerSettings, tokenizer: Any, problems: list[Problem]) -> None:
        from learner.admission import encode_prompt

        self.settings = settings
        self.tokenizer = tokenizer
        self.problems = problems
        o = settings.learner
        self.prompts = [
            encode_prompt(tokenizer, p.prompt, o.chat_template, o.prompt_template, o.system_prompt)
            for p in problems
        ]
        self.model: Any = None

    def _load(self, weights: Path) -> Any:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        if self.model is None:
            cuda = torch.cuda.is_available()
            self.model = AutoModelForCausalLM.from_pretrained(
                self.settings.learner.model, dtype=torch.bfloat16 if cuda else torch.float32
            ).to("cuda" if cuda else "cpu")
            self.model.eval()
        state: dict[str, Any] = {}
        for f in sorted(weights.glob("*.safetensors")):
            if not f.name.startswith("delta"):
                state.update(load_file(str(f)))
        missing, _ = self.model.load_state_dict(state, strict=False)
        tied = {k for k in missing if "lm_head" in k}  # tied to the embeddings
        if set(missing) - tied:
            raise RuntimeError(f"evaluation weights lack {sorted(set(missing) - tied)[:3]}")
        return self.model

    def accuracy(self, weights: Path, batch: int = 32) -> tuple[float, float]:
        """(greedy accuracy, seconds) of the weights in directory ``weights``."""
        import torch

        started = time.perf_counter()
        model = self._load(weights)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        correct = 0
        max_new = self.settings.learner.eval_max_tokens
        with torch.no_grad():
            for i in range(0, len(self.prompts), batch):
                chunk = self.prompts[i : i + batch]
                width = max(len(p) for p in chunk)
                device = model.device
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor(
                    [[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device
                )
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=pad,
                )
                for j, problem in enumerate(self.problems[i : i + batch]):
                    text = self.tokenizer.decode(out[j, width:], skip_special_tokens=True)
                    correct += reward_fn(problem.task)(text, problem.answer) > 0
                done = min(len(self.prompts), i + batch)
                log.info("evaluation: %d of %d problems", done, len(self.prompts))
        return correct / max(1, len(self.problems)), time.perf_counter() - started
