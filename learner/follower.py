"""A learner rank other than 0: it carries out rank 0's commands (``learner.ranks``) and talks to
nothing else (no Redis, no HTTP server, no metrics: rank 0 serves ``/metrics`` for the job)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from learner.batch import build_batch
from learner.canary import canary_logprobs
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.evaluate import Evaluator, eval_problems
from learner.ranks import Control, control, follow
from learner.trainer import Engine, save_pretrained, train_on_batch
from pipeline.config import LearnerSettings
from pipeline.wire.messages import TreeRollout, decode_as

log = logging.getLogger(__name__)


class Follower:
    """The ``Process`` a rank other than 0 runs."""

    def __init__(self, settings: LearnerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.ctl: Control = control()
        self.code = 1
        self.evaluator: Evaluator | None = None

    def handlers(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "save": self.save,
            "resume": self.resume,
            "gather": lambda c: save_pretrained(self.engine, None, c["weights_only"]),
            "evaluate": self.evaluate,
            "canary": lambda c: canary_logprobs(self.engine.module, c["token_ids"]),
        }

    def evaluate(self, command: dict[str, Any]) -> None:
        """This rank's share of rank 0's held-out evaluation (``learner.evaluate``)."""
        if self.evaluator is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.settings.learner.model)
            self.evaluator = Evaluator(self.settings, tokenizer, eval_problems(self.settings))
        self.evaluator.accuracy(self.engine.module, self.ctl, self.engine.zero_stage == 3)

    def step(self, command: dict[str, Any]) -> None:
        trees = [decode_as(data, TreeRollout) for data in command["trees"]]
        s = self.settings
        batch = build_batch(trees, s.loss.advantage, pad_id=command["pad_id"])
        train_on_batch(self.engine, batch, s.learner, s.loss, command["step"], s.run.seed)

    def save(self, command: dict[str, Any]) -> None:
        root = Path(self.settings.learner.work_dir) / "checkpoints"
        keep = self.settings.learner.keep_checkpoints
        save_checkpoint(root, command["step"], self.engine, {}, self.ctl, keep)

    def resume(self, command: dict[str, Any]) -> None:
        if command["path"]:
            load_checkpoint(Path(command["path"]), self.engine, self.ctl)
            log.info("rank %d resumed from %s", self.ctl.rank, command["path"])

    async def run(self, bound: int | None = None) -> int:
        self.code = await asyncio.to_thread(follow, self.handlers(), self.ctl)
        return 0

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: rank 0 decides (it finishes the step and checkpoints with us)."""
        log.info("rank %d: stopping when rank 0 says so", self.ctl.rank)

    def close(self) -> None:
        pass

    def exit_code(self) -> int:
        return self.code
