"""The learner process: admits prompts, consumes trees, trains, checkpoints, publishes weights.

Loop: admit prompts while fewer than ``(max_staleness + 1) * batch_prompts`` are outstanding in
the ledger (``learner.ledger``) -> admit again the prompts whose tree is overdue and that no live
sampler holds -> read trees (first this consumer's own pending entries, so a restart resumes
them) -> dead-letter trees for prompts it never admitted, skip trees already resolved (dedupe by
prompt and tree id), drop trees older than ``max_staleness`` versions (and admit their prompt
again) and, with dynamic sampling, trees whose leaves share one reward (each counted) -> once
``batch_prompts`` trees are ready: one importance-corrected update (``learner.trainer``) ->
policy version + 1 -> checkpoint -> XACK the trees it resolved -> every ``publish_every`` steps
export, serve and announce the weights.

Trees are acknowledged only after a checkpoint holds the update that used them, and the
checkpoint records every trained tree id and the ledger, so a crash neither loses nor
double-trains a tree; the step log is cut back to the checkpoint on resume, so it lists exactly
the trees each durable step trained.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from learner.admission import Admission, load_problems
from learner.batch import TrainBatch, build_batch
from learner.canary import canary_tokens
from learner.evaluate import Evaluator, eval_problems
from learner.follower import Follower
from learner.intake import Intake
from learner.metrics import LearnerMetrics
from learner.persistence import Persistence
from learner.ranks import control, launch, rank
from learner.rules import staleness
from learner.state import LearnerState, Resolved
from learner.steplog import TensorBoardLog, TrainingClock, step_record, write_step
from learner.trainer import Engine, StepStats, build_engine, train_on_batch
from pipeline.config import LearnerSettings
from pipeline.entry import ProcessSpec, exit_now, process_main
from pipeline.errors import ConfigError, Stopping
from pipeline.httpserver import make_app, start
from pipeline.seeds import derived_seed
from pipeline.treepo.tasks import Problem
from pipeline.weights.server import add_routes
from pipeline.wire.messages import TreeRollout, encode
from pipeline.wire.streams import PROMPT_GROUP, TREE_GROUP, Streams

log = logging.getLogger(__name__)

CONSUMER = "learner-0"


class Learner:
    def __init__(
        self,
        settings: LearnerSettings,
        engine: Engine,
        tokenizer: Any,
        problems: list[Problem],
        metrics: LearnerMetrics | None = None,
    ) -> None:
        opts = settings.learner
        if settings.run.max_staleness < opts.publish_every - 1:
            raise ConfigError(
                f"TREEPO_LEARNER__PUBLISH_EVERY={opts.publish_every} needs "
                f"TREEPO_RUN__MAX_STALENESS >= {opts.publish_every - 1} "
                f"(got {settings.run.max_staleness}): otherwise every tree is stale"
            )
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics or LearnerMetrics()
        self.work = Path(opts.work_dir)
        self.stop = asyncio.Event()
        self.streams = Streams.for_process(
            settings,
            int(engine.module.config.vocab_size),
            self.stop,
            lambda reason: self.metrics.deadletter.labels(reason).inc(),
        )
        self.admission = Admission(settings, self.streams, self.metrics, tokenizer, problems)
        self.intake = Intake(settings, self.streams, self.metrics, self.admission)
        self.durable = Persistence(settings, engine, self.streams, self.metrics, self.stop)
        self.durable.canary_ids = canary_tokens(tokenizer)
        self.ctl = control()
        self.rng = random.Random(derived_seed(settings.run.seed, "learner-rng"))
        self.state = self.durable.resume(self.rng) or LearnerState()
        self.since_step = Resolved()
        self.port = opts.port
        self.base_url = settings.weights.public_url
        self.clock = TrainingClock()
        self.tensorboard = TensorBoardLog(opts.tensorboard_dir) if opts.tensorboard_dir else None
        held_out = eval_problems(settings)
        self.evaluator = Evaluator(settings, tokenizer, held_out) if held_out else None
        self.last_eval: tuple[float, int] | None = None
        """(accuracy, step) of the newest held-out evaluation."""

    # -- state -----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.state.step

    def request_stop(self) -> None:
        self.stop.set()

    def close(self) -> None:
        """Nothing outlives ``run``: it checkpoints and acknowledges before returning."""

    def exit_code(self) -> int:
        return 0

    def health(self) -> dict[str, Any]:
        return {"ok": True, "step": self.state.step, "policy_version": self.version}

    # -- main loop -------------------------------------------------------------------------------

    async def run(self, max_steps: int | None = None) -> int:
        """Train until ``total_steps`` (or ``max_steps`` more steps, or a stop request)."""
        keys, opts = self.streams.keys, self.settings.learner
        target = (
            opts.total_steps
            if max_steps is None
            else min(opts.total_steps, self.state.step + max_steps)
        )
        await self.streams.ensure_group(keys.prompts, PROMPT_GROUP)
        await self.streams.ensure_group(keys.trees, TREE_GROUP)
        app = make_app(self.metrics.registry, self.health, {"run": self.settings.run.name})
        token = self.settings.weights.token
        served = add_routes(
            app,
            self.durable.store,
            token.get_secret_value() if token else None,
            slots=self.settings.weights.serve_slots,
        )
        self.metrics.weight_bytes_served.set_function(lambda: served.bytes_sent)
        runner, self.port = await start(app, opts.host, opts.port)
        self.base_url = self.base_url or f"http://{opts.host}:{self.port}"
        log.info("learner serving weights and /metrics at %s", self.base_url)
        try:
            await self._publish()
            # first this consumer's own pending entries (a restart resumes them), then new ones
            trees = self.streams.consumer(keys.trees, TREE_GROUP, CONSUMER, stop=self.stop)
            while self.state.step < target and not self.stop.is_set() and not self.budget_spent():
                await self.admission.admit(self.state)
                waiting = self.intake.waiting()
                await self.admission.readmit_overdue(self.state, self.since_step, waiting)
                waited = time.monotonic()
                batch = await anext(trees, [])
                self.metrics.wait_seconds.inc(self.clock.waited(waited, bool(batch)))
                await self.intake.take(batch, self.state, self.since_step)
                await self._observe_streams()
                await self.intake.drop_now_stale(self.state, self.since_step)
                if len(self.intake.ready) >= opts.batch_prompts:
                    await self._step()
                elif self.ctl.ping_due():  # the other ranks wait for commands: keep them sure
                    await asyncio.to_thread(self.ctl.send, "ping")
            if self.state.step >= opts.total_steps or self.budget_spent():
                await asyncio.to_thread(
                    self.durable.save_final_model, self.tokenizer, self.state.step
                )
        except Stopping as exc:
            log.info("stopping: %s", exc)
        finally:
            try:
                if self.intake.resolved_entries and self.state.step > 0:
                    await self._checkpoint()
            finally:
                await runner.cleanup()
                await self.streams.close()
                await asyncio.to_thread(self.ctl.send, "stop")
        return self.state.step

    def budget_spent(self) -> bool:
        """True once the time or token budget (when set) is used up."""
        opts = self.settings.learner
        if opts.max_seconds and self.clock.training_seconds(started=False) >= opts.max_seconds:
            return True
        return bool(opts.token_budget) and self.state.tokens_received >= opts.token_budget

    async def _observe_streams(self) -> None:
        info = await self.streams.group_info(self.streams.keys.trees, TREE_GROUP)
        self.metrics.stream_lag.set(info.lag)
        self.metrics.stream_pending.set(info.pending)

    async def _step(self) -> None:
        opts = self.settings.learner
        taken = self.intake.next_batch(opts.batch_prompts)
        trees = [t for _, t in taken]
        lags = [staleness(t, self.version) for t in trees]
        batch = build_batch(trees, self.settings.loss.advantage, self.tokenizer.pad_token_id or 0)
        started = time.perf_counter()
        stats = await asyncio.to_thread(self._train, trees, batch)
        seconds = time.perf_counter() - started
        self.state.step += 1
        self.intake.trained(taken, self.state)
        received = self.intake.leaves_received()
        record = step_record(
            self.state, self.version, trees, lags, batch.rewards, received, stats, seconds,
            self.clock, self.since_step, self.last_eval,
        )  # fmt: skip
        self.metrics.observe_step(record, lags, stats.tokens)
        self.since_step = Resolved()
        write_step(self.work, record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if (
            self.state.step % opts.checkpoint_every == 0
            or self.state.step >= opts.total_steps
            or self.budget_spent()
        ):
            await self._checkpoint()
        if self.state.step % opts.publish_every == 0:
            await self._publish()
        if self.evaluator is not None and self.state.step % opts.eval_every == 0:
            await self._evaluate()

    def _train(self, trees: list[TreeRollout], batch: TrainBatch) -> StepStats:
        """The update, on every rank: the others get the trees and build the same batch."""
        pad_id = self.tokenizer.pad_token_id or 0
        step = self.state.step
        self.ctl.send("step", step=step, pad_id=pad_id, trees=[encode(t) for t in trees])
        s = self.settings
        return train_on_batch(self.engine, batch, s.learner, s.loss, step, s.run.seed)

    async def _checkpoint(self) -> None:
        entries, self.intake.resolved_entries = self.intake.resolved_entries, []
        left = await self.durable.checkpoint(self.state, self.rng, entries)
        self.intake.resolved_entries = left + self.intake.resolved_entries

    async def _publish(self) -> None:
        await self.durable.publish(self.version, self.base_url)

    async def _evaluate(self) -> None:
        """Greedy held-out accuracy of the weights just published (their version's files)."""
        assert self.evaluator is not None
        if self.version not in self.durable.store.versions():
            await self._publish()
        accuracy, seconds = await asyncio.to_thread(
            self.evaluator.record, self.engine, self.ctl, self.work, self.state.step, self.version
        )
        self.last_eval = (accuracy, self.state.step)
        self.metrics.eval_accuracy.set(accuracy)
        self.metrics.eval_seconds.observe(seconds)


# -- entry point ---------------------------------------------------------------------------------


def build_learner(settings: LearnerSettings) -> Learner | Follower:
    from transformers import AutoTokenizer

    model = settings.learner.model
    if not model or not Path(model).is_dir():
        raise ConfigError(f"TREEPO_LEARNER__MODEL: {model!r} is not a model directory")
    problems = load_problems(settings)  # a bad dataset or reward fails before DeepSpeed starts
    eval_problems(settings)  # so does a bad evaluation split
    import torch

    torch.manual_seed(derived_seed(settings.run.seed, "learner"))  # every rank alike
    engine = build_engine(model, settings.learner)
    if rank() != 0:
        return Follower(settings, engine)
    tokenizer = AutoTokenizer.from_pretrained(model)
    return Learner(settings, engine, tokenizer, problems)


SPEC = ProcessSpec(
    prog="treepo-learner",
    description="TreePO learner",
    settings=LearnerSettings,
    section="learner",
    build=build_learner,
    bound_flag="--max-steps",
    bound_help="stop after this many more steps (bounded mode)",
    done="learner exits at step %d",
    options=(
        (
            "--ranks",
            {
                "type": int,
                "default": 1,
                "help": "run as this many local ranks under the DeepSpeed launcher (data "
                "parallel, TREEPO_LEARNER__ZERO_STAGE partitions; default 1)",
            },
        ),
    ),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ranks", type=int, default=1)
    known, _ = pre.parse_known_args(argv)
    if known.ranks > 1 and "WORLD_SIZE" not in os.environ:
        return launch(known.ranks, "learner.process", argv)
    return process_main(SPEC, argv)


def run() -> None:
    """Console-script entry (``treepo-learner``)."""
    exit_now(main)


if __name__ == "__main__":
    run()
