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

import asyncio
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from learner.batch import build_batch
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.ledger import Outcome, prompt_id
from learner.metrics import LearnerMetrics
from learner.rules import Verdict, leaf_summary, staleness, triage
from learner.state import LearnerState, Resolved
from learner.steplog import StepRecord, cut_step_log, write_step
from learner.trainer import Engine, StepStats, build_engine, export_weights, train_on_batch
from learner.weight_server import WeightStore, add_routes, announce
from pipeline.config import LearnerSettings
from pipeline.entry import ProcessSpec, exit_now, process_main
from pipeline.errors import ConfigError, Stopping, TransportError
from pipeline.httpserver import make_app, start
from pipeline.messages import DecodeLimits, PromptTask, TreeRollout
from pipeline.streams import PROMPT_GROUP, TREE_GROUP, Delivery, Streams
from pipeline.tasks import ArithTask, Problem, load_dataset

log = logging.getLogger(__name__)

CONSUMER = "learner-0"


def load_problems(settings: LearnerSettings) -> list[Problem]:
    opts = settings.learner
    if opts.dataset == "arith":
        return ArithTask().problems("train", 100_000, seed=settings.run.seed)
    return load_dataset(opts.dataset, opts.prompt_field, opts.answer_field, opts.task)


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
        self.problems = problems
        self.metrics = metrics or LearnerMetrics()
        self.work = Path(opts.work_dir)
        self.ckpt_root = self.work / "checkpoints"
        self.store = WeightStore(self.work / "weights", keep=settings.weights.keep_versions)
        self.streams = Streams(
            settings.redis,
            settings.run,
            settings.streams,
            DecodeLimits(
                max_bytes=settings.streams.max_message_bytes,
                vocab_size=int(engine.module.config.vocab_size),
            ),
        )
        self.state = LearnerState()
        self.since_step = Resolved()
        self.rng = random.Random(settings.run.seed)
        self.ready: list[tuple[Delivery, TreeRollout]] = []
        self.resolved_entries: list[str] = []
        self.stop = asyncio.Event()
        self.streams.stop = self.stop
        self.streams.on_deadletter = lambda reason: self.metrics.deadletter.labels(reason).inc()
        self.last_overdue_check = 0.0
        self.port = opts.port
        self.base_url = settings.weights.public_url
        self.started = time.monotonic()
        self.first_tree_at: float | None = None
        """When the first tree arrived (the training clock of ``max_seconds`` starts here)."""
        self.wait_seconds = 0.0
        """Seconds spent waiting for trees after the first one arrived (idle time)."""
        self.received_leaves: list[float] = []
        """Leaf rewards of every tree received since the last step, dropped ones included: an
        unfiltered view of what the samplers' policy scores (the trained batch is filtered)."""
        self._resume()

    # -- state -----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.state.step

    def _resume(self) -> None:
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            return
        if self.engine.zero_stage > 0:
            raise ConfigError(
                f"resuming from {path} needs TREEPO_LEARNER__ZERO_STAGE=0: optimizer "
                "partitions of ZeRO stages 1-3 are not restored yet"
            )
        saved = load_checkpoint(path, self.engine.module, self.engine.optimizer)
        self.state = LearnerState.from_json(saved)
        cut_step_log(self.work, self.state.step)
        if self.state.python_rng is not None:
            version, internal, gauss = self.state.python_rng
            self.rng.setstate((version, tuple(internal), gauss))
        log.info(
            "resumed from %s: step %d, cursor %d, %d trees trained",
            path,
            self.state.step,
            self.state.cursor,
            len(self.state.trained),
        )

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
        app = make_app(self.metrics.registry, self.health)
        token = self.settings.weights.token
        add_routes(app, self.store, token.get_secret_value() if token else None)
        runner, self.port = await start(app, opts.host, opts.port)
        self.base_url = self.base_url or f"http://{opts.host}:{self.port}"
        log.info("learner serving weights and /metrics at %s", self.base_url)
        try:
            await self._publish()
            # first this consumer's own pending entries (a restart resumes them), then new ones
            trees = self.streams.consumer(keys.trees, TREE_GROUP, CONSUMER, stop=self.stop)
            while self.state.step < target and not self.stop.is_set() and not self.budget_spent():
                await self._admit()
                await self._readmit_overdue()
                waited = time.monotonic()
                batch = await anext(trees, [])
                if self.first_tree_at is not None and self.first_tree_at < waited:
                    self.wait_seconds += time.monotonic() - waited
                self.metrics.wait_seconds.inc(time.monotonic() - waited)
                await self._take(batch)
                await self._observe_streams()
                await self._drop_now_stale()
                if len(self.ready) >= opts.batch_prompts:
                    await self._step()
            if self.state.step >= opts.total_steps or self.budget_spent():
                await asyncio.to_thread(self.save_final_model)
        except Stopping as exc:
            log.info("stopping: %s", exc)
        finally:
            if self.resolved_entries and self.state.step > 0:
                await self._checkpoint()
            await runner.cleanup()
            await self.streams.close()
        return self.state.step

    def budget_spent(self) -> bool:
        """True once the time or token budget (when set) is used up."""
        opts = self.settings.learner
        if (
            opts.max_seconds
            and self.first_tree_at is not None
            and time.monotonic() - self.first_tree_at >= opts.max_seconds
        ):
            return True
        return bool(opts.token_budget) and self.state.tokens_received >= opts.token_budget

    async def _observe_streams(self) -> None:
        info = await self.streams.group_info(self.streams.keys.trees, TREE_GROUP)
        self.metrics.stream_lag.set(info.lag)
        self.metrics.stream_pending.set(info.pending)

    async def _admit(self) -> None:
        """Admit prompts up to the staleness bound (AReaL's rule) on outstanding prompts."""
        opts = self.settings.learner
        limit = (self.settings.run.max_staleness + 1) * opts.batch_prompts
        ledger = self.state.ledger
        while len(ledger.outstanding) < limit:
            pos = self.state.cursor
            entry_id = await self._publish_prompt(pos)
            ledger.admit(prompt_id(pos), pos, entry_id, time.time())
            self.state.cursor += 1
            self.metrics.prompts_admitted.inc()
        self.metrics.prompts_in_flight.set(len(ledger.outstanding))

    async def _publish_prompt(self, pos: int) -> str:
        problem = self.problems[pos % len(self.problems)]
        task = PromptTask(
            prompt_id(pos),
            self.encode_prompt(problem.prompt),
            problem.answer,
            pos,
            self.version,
            problem.task,
            time.time(),
        )
        return await self.streams.publish(self.streams.keys.prompts, task)

    async def _readmit(self, pid: str, stale: bool) -> bool:
        """Admit ``pid`` once more; False (and the prompt is abandoned) once it has been
        admitted ``max_admissions`` times."""
        ledger = self.state.ledger
        a = ledger.outstanding[pid]
        if a.attempts >= self.settings.learner.max_admissions:
            self._abandon(pid, f"after {a.attempts} admissions")
            return False
        entry_id = await self._publish_prompt(a.position)
        ledger.readmit(pid, entry_id, time.time(), stale)
        self.since_step.readmitted.append(pid)
        self.metrics.prompts_readmitted.labels("stale" if stale else "overdue").inc()
        return True

    async def _readmit_overdue(self) -> None:
        """Admit again every prompt whose tree is overdue: not waiting here for a batch, not
        queued on the prompts stream, not held by a live sampler (checked every few seconds)."""
        after = self.settings.learner.readmit_after_s
        now = time.monotonic()
        if now - self.last_overdue_check < min(10.0, after / 4):
            return
        self.last_overdue_check = now
        overdue = self.state.ledger.overdue(time.time(), after)
        if not overdue:
            return
        keys = self.streams.keys
        if (await self.streams.group_info(keys.trees, TREE_GROUP)).lag > 0:
            return  # trees not yet read may be the overdue ones
        waiting = {t.prompt_id for _, t in self.ready}  # arrived, waiting for a full batch
        for a in overdue:
            if a.prompt_id in waiting:
                continue
            where, consumer = await self.streams.entry_state(keys.prompts, PROMPT_GROUP, a.entry_id)
            if where == "queued":
                continue
            if where == "pending" and consumer and await self.streams.alive([consumer]):
                continue
            log.warning(
                "prompt %s overdue (%.0fs, entry %s %s); admitting it again",
                a.prompt_id,
                time.time() - a.admitted_at,
                a.entry_id,
                where if consumer is None else f"held by dead {consumer}",
            )
            await self._readmit(a.prompt_id, stale=False)

    def encode_prompt(self, text: str) -> list[int]:
        if self.settings.learner.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            return list(ids)
        return list(self.tokenizer(text)["input_ids"])

    async def _take(self, batch: list[Delivery]) -> None:
        """Sort consumed trees into ready, duplicate, dropped (each counted) or dead-lettered
        (the verdicts of ``learner.rules.triage``)."""
        for d in batch:
            tree: TreeRollout = d.message  # type: ignore[assignment]  # the transport checked
            self.metrics.trees_consumed.inc()
            if self.first_tree_at is None:
                self.first_tree_at = time.monotonic()
            self.state.tokens_received += tree.stats.decoded_tokens
            verdict = triage(
                tree,
                self.state.ledger.status(tree.prompt_id),
                self.state.cursor,
                self.state.trained,
                {t.prompt_id for _, t in self.ready},
                self.version,
                self.settings.run.max_staleness,
                self.settings.learner.dynamic_sampling,
            )
            if verdict in ("stale", "no_signal", "ready"):
                self.received_leaves.extend(leaf.reward for leaf in tree.leaves)
            await self._apply(verdict, d, tree)

    async def _apply(self, verdict: Verdict, d: Delivery, tree: TreeRollout) -> None:
        if verdict == "ready":
            self.ready.append((d, tree))
        elif verdict in ("duplicate", "before_restart"):
            if verdict == "before_restart":  # its position will be admitted and sampled again
                log.info("tree %s is for a prompt admitted before a restart", tree.tree_id)
            self.metrics.trees_duplicate.inc()
            self.resolved_entries.append(d.entry_id)
        elif verdict == "unknown":
            detail = f"tree {tree.tree_id} for prompt {tree.prompt_id}, never admitted"
            await self.streams.reject(d, TREE_GROUP, "unknown_prompt", detail)
        elif verdict == "sampling":  # a sampler of another build or setting: not trainable
            detail = f"tree {tree.tree_id} sampled with top_p {tree.top_p} < 1"
            # the prompt stays outstanding: once overdue it is admitted again (and abandoned
            # after max_admissions), so a correctly configured sampler can still serve it
            await self.streams.reject(d, TREE_GROUP, "sampling", detail)
        elif verdict == "stale":
            await self._drop_stale(d, tree)
        else:  # no_signal
            self.state.dropped_no_signal += 1
            self.metrics.trees_dropped_no_signal.inc()
            self.resolved_entries.append(d.entry_id)
            self._finish(tree.prompt_id, "no_signal")
            self.since_step.no_signal.append(tree.tree_id)

    async def _drop_stale(self, d: Delivery, tree: TreeRollout) -> None:
        self.state.dropped_stale += 1
        self.metrics.trees_dropped_stale.inc()
        self.resolved_entries.append(d.entry_id)
        if not self.settings.learner.readmit_stale:
            self._abandon(tree.prompt_id, "its tree was stale")
        else:
            await self._readmit(tree.prompt_id, stale=True)

    async def _drop_now_stale(self) -> None:
        """Trees wait in ``ready`` while steps go on: drop those that became older than
        ``max_staleness`` versions, so no trained tree is (docs/algorithm.md)."""
        fresh = []
        for d, tree in self.ready:
            if staleness(tree, self.version) > self.settings.run.max_staleness:
                await self._drop_stale(d, tree)
            else:
                fresh.append((d, tree))
        self.ready = fresh

    def _finish(self, pid: str, outcome: Outcome) -> None:
        self.state.ledger.finish(pid, outcome)

    def _abandon(self, pid: str, why: str) -> None:
        self._finish(pid, "abandoned")
        self.since_step.abandoned.append(pid)
        self.metrics.prompts_abandoned.inc()
        log.warning("prompt %s abandoned: %s", pid, why)

    async def _step(self) -> None:
        opts = self.settings.learner
        taken, self.ready = self.ready[: opts.batch_prompts], self.ready[opts.batch_prompts :]
        trees = [t for _, t in taken]
        lags = [staleness(t, self.version) for t in trees]
        batch = build_batch(
            trees, self.settings.loss.advantage, pad_id=self.tokenizer.pad_token_id or 0
        )
        started = time.perf_counter()
        stats = await asyncio.to_thread(
            train_on_batch,
            self.engine,
            batch,
            opts,
            self.settings.loss,
            self.state.step,
            self.settings.run.seed,
        )
        seconds = time.perf_counter() - started
        self.state.step += 1
        for d, t in taken:
            self.state.trained.add(t.tree_id)
            self._finish(t.prompt_id, "trained")
            self.resolved_entries.append(d.entry_id)
        record = self._record(trees, lags, batch.rewards, stats, seconds)
        self.metrics.observe_step(record, lags, stats.tokens)
        self.since_step = Resolved()
        write_step(self.work, record)
        if (
            self.state.step % opts.checkpoint_every == 0
            or self.state.step >= opts.total_steps
            or self.budget_spent()
        ):
            await self._checkpoint()
        if self.state.step % opts.publish_every == 0:
            await self._publish()

    def _record(
        self,
        trees: list[TreeRollout],
        lags: list[int],
        rewards: list[float],
        stats: StepStats,
        seconds: float,
    ) -> StepRecord:
        """The step log record of the step just taken (and the reset of the leaves received)."""
        reward, accuracy = leaf_summary(rewards)
        sampled_reward, sampled_accuracy = (
            leaf_summary(self.received_leaves) if self.received_leaves else (None, None)
        )
        self.received_leaves = []
        record = StepRecord(
            step=self.state.step,
            version=self.version,
            reward=reward,
            accuracy=accuracy,
            sampled_reward=sampled_reward,
            sampled_accuracy=sampled_accuracy,
            trees=len(trees),
            leaves=len(rewards),
            staleness_mean=sum(lags) / len(lags),
            staleness_max=max(lags),
            seconds=seconds,
            tokens_per_second=stats.tokens / max(seconds, 1e-9),
            wall=time.monotonic() - self.started,
            training_seconds=time.monotonic() - (self.first_tree_at or self.started),
            wait_seconds=self.wait_seconds,
            tokens_received=self.state.tokens_received,
            dropped_stale=self.state.dropped_stale,
            dropped_no_signal=self.state.dropped_no_signal,
            tree_ids=[t.tree_id for t in trees],
            no_signal_ids=self.since_step.no_signal,
            abandoned_ids=self.since_step.abandoned,
            readmitted_ids=self.since_step.readmitted,
            outstanding=len(self.state.ledger.outstanding),
            **StepRecord.loss_fields(stats),
        )
        return record

    def save_final_model(self) -> Path:
        """The trained policy as a normal Hugging Face model directory (``<work>/model``)."""
        out = self.work / "model"
        self.engine.module.save_pretrained(str(out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
        log.info("final model (step %d) saved to %s", self.state.step, out)
        return out

    async def _checkpoint(self) -> None:
        started = time.perf_counter()
        self.state.python_rng = self.rng.getstate()
        opts = self.settings.learner
        await asyncio.to_thread(
            save_checkpoint,
            self.ckpt_root,
            self.state.step,
            self.engine.module,
            self.engine.optimizer,
            self.state.to_json(),
            0,
            opts.keep_checkpoints,
        )
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
        entries, self.resolved_entries = self.resolved_entries, []
        keys = self.streams.keys
        try:
            await self.streams.ack(keys.trees, TREE_GROUP, entries)
            # the streams only keep what some group has yet to read or acknowledge
            for stream in (keys.trees, keys.prompts):
                await self.streams.trim_acknowledged(stream)
        except (TransportError, Stopping) as exc:
            if not self.stop.is_set():
                raise
            # stopping: the shutdown's last checkpoint tries once more; if Redis is away, the
            # trees stay pending and come back to this consumer on restart, where the
            # checkpoint marks them as already resolved
            self.resolved_entries = entries + self.resolved_entries
            log.warning("stopping: %d trees not acknowledged yet (%s)", len(entries), exc)

    async def _publish(self) -> None:
        started = time.perf_counter()
        version = self.version
        if version not in self.store.versions():
            await asyncio.to_thread(
                self.store.publish, version, lambda d: export_weights(self.engine, d)
            )
        data = self.store.manifest_bytes(version)
        total = sum(p.stat().st_size for p in self.store.path(version).glob("*.safetensors"))
        token = self.settings.weights.token
        try:
            await announce(
                self.streams,
                version,
                self.base_url,
                data,
                total,
                token.get_secret_value() if token else None,
            )
        except (TransportError, Stopping) as exc:
            if not self.stop.is_set():
                raise
            # stopping with Redis away: the version is in the checkpoint and the weight store,
            # and a restarted learner announces it first thing
            log.warning("stopping: weights v%d not announced (%s)", version, exc)
            return
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self.metrics.publish_bytes.inc(total)


# -- entry point ---------------------------------------------------------------------------------


def build_learner(settings: LearnerSettings) -> Learner:
    from transformers import AutoTokenizer

    model = settings.learner.model
    if not model or not Path(model).is_dir():
        raise ConfigError(f"TREEPO_LEARNER__MODEL: {model!r} is not a model directory")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("the learner process runs on one rank for now (WORLD_SIZE > 1 given)")
    engine = build_engine(model, settings.learner)
    tokenizer = AutoTokenizer.from_pretrained(model)
    return Learner(settings, engine, tokenizer, load_problems(settings))


SPEC = ProcessSpec(
    prog="treepo-learner",
    description="TreePO learner",
    settings=LearnerSettings,
    section="learner",
    build=build_learner,
    bound_flag="--max-steps",
    bound_help="stop after this many more steps (bounded mode)",
    done="learner exits at step %d",
)


def main(argv: list[str] | None = None) -> int:
    return process_main(SPEC, argv)


def run() -> None:
    """Console-script entry (``treepo-learner``)."""
    exit_now(main)


if __name__ == "__main__":
    run()
