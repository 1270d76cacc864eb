"""Periodic held-out evaluation: greedy accuracy of the published policy on an evaluation split.

Every ``TREEPO_LEARNER__EVAL_EVERY`` steps, right after publishing, every learner rank answers
its share of ``eval_size`` problems of the evaluation split greedily with the training model
itself (the weights just published; no second copy of the model is loaded), prompts rendered
exactly as for training (prompt template, chat template, system prompt), each scored by its
reward function, and the ranks sum their counts. All ranks make as many generate calls, and
under ZeRO-3 generate in step (``synced_gpus``), so none waits on another's evaluation.
The accuracy goes into the step log (``eval_accuracy``) and ``treepo_learner_eval_accuracy``.

The split: ``TREEPO_LEARNER__EVAL_DATASET`` (a JSONL/Parquet file or ``save_to_disk`` directory
with the training dataset's fields), or, for the built-in task, its held-out split (disjoint from
training by construction).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from learner.ranks import Control, share
from pipeline.config import LearnerSettings
from pipeline.errors import ConfigError, DatasetError
from pipeline.treepo.tasks import ArithTask, Problem, load_dataset, reward_fn

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

    def accuracy(
        self, module: Any, ctl: Control, zero3: bool = False, batch: int = 32
    ) -> tuple[float, float]:
        """(greedy accuracy, seconds) of ``module``: this rank answers its share of the
        problems, every rank calls this at once (rank 0 sends ``evaluate`` first)."""
        started = time.perf_counter()
        answers = self.answers(module, ctl, zero3, batch)
        correct = 0
        for j, text in answers.items():
            problem = self.problems[j]
            correct += reward_fn(problem.task)(text, problem.answer) > 0
        total = ctl.sum([float(correct)])[0]
        return total / max(1, len(self.problems)), time.perf_counter() - started

    def record(
        self, engine: Any, ctl: Control, work: Path, step: int, version: int
    ) -> tuple[float, float]:
        """(Rank 0.) ``accuracy`` of the training module on every rank (it tells the others to
        join), appended to ``<work>/evals.jsonl`` and logged in one line."""
        ctl.send("evaluate")
        accuracy, seconds = self.accuracy(engine.module, ctl, engine.zero_stage == 3)
        n = len(self.problems)
        line = {"step": step, "version": version, "accuracy": accuracy, "problems": n}
        with (work / "evals.jsonl").open("a") as f:
            f.write(json.dumps({**line, "seconds": seconds}) + "\n")
        log.info(
            "evaluation at step %d: greedy accuracy %.3f on %d held-out problems (%.1fs)",
            step, accuracy, n, seconds,
        )  # fmt: skip
        return accuracy, seconds

    def answers(
        self, module: Any, ctl: Control, zero3: bool = False, batch: int = 32
    ) -> dict[int, str]:
        """Problem index -> greedy answer, for this rank's share of the problems (contiguous).
        Every rank makes as many generate calls; under ZeRO-3 they generate in step."""
        import torch

        mine = list(range(len(self.prompts)))[share(len(self.prompts), ctl.world, ctl.rank)]
        parts = [mine[i : i + batch] for i in range(0, len(mine), batch)]
        calls = ctl.max(len(parts))
        out: dict[int, str] = {}
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                for i in range(calls):
                    part = parts[i] if i < len(parts) else []
                    texts = self._answer(module, part or [0], zero3 and ctl.world > 1)
                    out.update(zip(part, texts))
                    if ctl.rank == 0:
                        log.info("evaluation: %d of %d problems (rank 0)", len(out), len(mine))
        finally:
            module.train(was_training)
        return out

    def _answer(self, module: Any, which: list[int], synced: bool) -> list[str]:
        """Greedy answers to the prompts ``which`` (left-padded into one batch)."""
        import torch

        chunk = [self.prompts[j] for j in which]
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        width = max(len(p) for p in chunk)
        device = next(module.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = module.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.settings.learner.eval_max_tokens,
            do_sample=False,
            pad_token_id=pad,
            use_cache=True,
            synced_gpus=synced,
        )
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
