"""The sampler process: claims prompts, grows TreePO trees with vLLM, publishes them.

Loop: swap in staged weights -> claim up to ``batch_prompts`` PromptTasks (reclaiming dead
samplers' entries first) -> dead-letter the ones it cannot use (too long for the engine, unknown
reward function, token ids outside the vocabulary) -> grow one tree per prompt (one engine call
per segment step) -> score leaves -> XADD one TreeRollout per prompt -> XACK the prompts.
Background tasks keep a heartbeat key alive and follow the weight announcements
(``workers.follow``); before its first prompt the sampler takes the newest verified weights.
SIGTERM stops at once, also in the middle of an engine call or while Redis is down: the
unfinished prompts are handed back (``Streams.release``) and the process exits.

What the learner does with the trees is in ``learner/``; the algorithm is ``pipeline.sampling``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.aio import Background, unless_stopped
from pipeline.config import SamplerSettings
from pipeline.entry import ProcessSpec, exit_now, process_main
from pipeline.errors import ConfigError, Stopping, TransportError
from pipeline.httpserver import make_app, start
from pipeline.messages import PromptTask, TreeRollout
from pipeline.rewards import WRONG
from pipeline.sampling import TreeSampler
from pipeline.streams import PROMPT_GROUP, TREE_GROUP, Delivery, Streams
from pipeline.tasks import reward_fn
from workers.accounting import Accounting
from workers.engine import EngineOptions, GenerationStopped, VLLMSegmentGenerator
from workers.follow import WeightFollower
from workers.heartbeat import HeartbeatSender
from workers.metrics import SamplerMetrics
from workers.prompts import prompt_problem

log = logging.getLogger(__name__)


class Sampler:
    """One sampler worker around one engine. ``run`` is the process's main loop."""

    def __init__(
        self,
        settings: SamplerSettings,
        engine: VLLMSegmentGenerator,
        decode_text: Callable[[list[int]], str],
        metrics: SamplerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.decode_text = decode_text
        self.metrics = metrics or SamplerMetrics()
        opts = settings.sampler
        self.worker_id = opts.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.stop = asyncio.Event()
        self.streams = Streams.for_process(
            settings,
            engine.vocab_size,
            self.stop,
            lambda reason: self.metrics.deadletter.labels(reason).inc(),
        )
        tree_cfg = settings.tree
        if tree_cfg.eos_token_id is None and engine.eos_token_id is not None:
            tree_cfg = tree_cfg.model_copy(update={"eos_token_id": engine.eos_token_id})
        self.tree_sampler = TreeSampler(
            engine,
            tree_cfg,
            rng=random.Random(f"{settings.run.seed}-{self.worker_id}"),
            decode=decode_text,
        )
        self.work_dir = Path(opts.work_dir) / self.worker_id
        self.accounting = Accounting(self.metrics, self.work_dir / "summary.json")
        engine.call_listeners.append(self.accounting.on_call)
        self.follower = WeightFollower.for_sampler(
            settings, self.streams, engine, self.metrics, self.work_dir
        )
        self.heartbeat = HeartbeatSender(
            self.streams,
            self.worker_id,
            "sampler",
            lambda: engine.policy_version,
            self.stop,
            opts.heartbeat_ttl_s,
        )
        self.prompts_done = 0
        self.port = opts.port
        self.failed: BaseException | None = None
        self.progress_at = time.monotonic()
        """When the loop last finished an iteration (health: a stuck loop is not ok)."""
        self.metrics.policy_version.set(engine.policy_version)

    # -- main loop -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop at the next segment step (signal-safe)."""
        self.stop.set()
        self.engine.stop.set()

    def close(self) -> None:
        """End the engine's processes (after ``run``)."""
        self.engine.close()

    def exit_code(self) -> int:
        return 1 if self.failed is not None else 0

    def health(self) -> dict[str, Any]:
        problem = "stopping" if self.stop.is_set() else self.follower.trouble()
        stuck = time.monotonic() - self.progress_at
        if problem is None and stuck > self.settings.sampler.unhealthy_after_s:
            problem = f"no progress for {stuck:.0f}s"
        return {
            "ok": problem is None,
            "problem": problem,
            "worker_id": self.worker_id,
            "policy_version": self.engine.policy_version,
            "verified_version": self.follower.verified,
            "announced_version": self.follower.announced,
            "prompts_done": self.prompts_done,
        }

    async def run(self, max_prompts: int | None = None) -> int:
        """Serve until stopped (or ``max_prompts`` prompts are done); returns prompts done."""
        keys = self.streams.keys
        self.accounting.started = time.monotonic()
        await self.streams.ensure_group(keys.prompts, PROMPT_GROUP)
        await self.streams.ensure_group(keys.trees, TREE_GROUP)
        runner, self.port = await start(
            make_app(self.metrics.registry, self.health),
            self.settings.sampler.host,
            self.settings.sampler.port,
        )
        log.info(
            "sampler %s serving /metrics on %s:%d",
            self.worker_id,
            self.settings.sampler.host,
            self.port,
        )
        background = Background(self._fail)
        try:
            await self.follower.poll()  # the newest verified weights before the first prompt
            background.start("heartbeat", self.heartbeat.loop())
            poll_s = self.settings.sampler.weights_poll_s
            background.start("weights", self.follower.follow(self.stop, poll_s))
            await self._loop(max_prompts)
        except Stopping as exc:
            log.info("stopping: %s", exc)
        finally:
            self.stop.set()
            await background.close()
            self.write_summary()
            await self.heartbeat.send("stopped")
            await runner.cleanup()
            await self.streams.close()
        return self.prompts_done

    def write_summary(self) -> Path:
        """Final counters of this sampler as JSON (``<work_dir>/<worker>/summary.json``)."""
        return self.accounting.write_summary(self.engine.policy_version)

    def _fail(self, error: BaseException) -> None:
        self.failed = error
        self.request_stop()

    async def _loop(self, max_prompts: int | None) -> None:
        opts = self.settings.sampler

        def wanted() -> int:  # asked before each read
            self.progress_at = time.monotonic()
            left = opts.batch_prompts if max_prompts is None else max_prompts - self.prompts_done
            return min(opts.batch_prompts, left)

        prompts = self.streams.consumer(
            self.streams.keys.prompts,
            PROMPT_GROUP,
            self.worker_id,
            count=wanted,
            stop=self.stop,
            reclaim_every_s=self.streams.default_reclaim_s,
        )
        await self.follower.apply_staged()
        waited = time.monotonic()
        async for batch in prompts:
            usable = await self._usable(batch)
            if usable:
                await self._serve(usable)
            else:
                self.metrics.idle_seconds.inc(time.monotonic() - waited)
            await self.follower.apply_staged()
            waited = time.monotonic()

    async def _usable(self, batch: list[Delivery]) -> list[Delivery]:
        """The deliveries this sampler can grow trees for; the rest are dead-lettered."""
        good = []
        for d in batch:
            problem = prompt_problem(
                d.message,  # type: ignore[arg-type]  # the transport checked the type
                self.settings.sampler.default_task,
                self.engine.max_model_len,
                self.tree_sampler.config.response_cap,
            )
            if problem is None:
                good.append(d)
            else:
                await self.streams.reject(d, PROMPT_GROUP, *problem)
        return good

    async def _grow(self, tasks: list[PromptTask]) -> list[TreeRollout | str]:
        """One tree per prompt, or the engine's refusal of that prompt (a ValueError/TypeError
        from request validation). Raises ``Stopping`` when the process is asked to stop."""
        work = self.tree_sampler.expand([t.prompt_token_ids for t in tasks])
        try:
            return list(await unless_stopped(self.stop, work, "an engine call"))
        except GenerationStopped as exc:
            raise Stopping(str(exc)) from exc
        except (ValueError, TypeError) as exc:
            if len(tasks) == 1:
                log.error("engine refused prompt %s: %s", tasks[0].prompt_id, exc)
                return [f"{type(exc).__name__}: {exc}"]
        out: list[TreeRollout | str] = []
        for t in tasks:  # grow them one by one to find the one(s) at fault
            out.extend(await self._grow([t]))
        return out

    async def _serve(self, batch: list[Delivery]) -> None:
        keys = self.streams.keys
        tasks: list[PromptTask] = [d.message for d in batch]  # type: ignore[misc]
        now = time.time()
        for t in tasks:
            if t.created_at > 0:
                self.metrics.prompt_wait_seconds.observe(max(0.0, now - t.created_at))
        started = time.perf_counter()
        self.accounting.begin_batch()
        try:
            grown = await self._grow(tasks)
        except Stopping:
            await self._release(batch)
            raise
        done: list[str] = []
        served: list[PromptTask] = []
        trees: list[TreeRollout] = []
        for d, task, tree in zip(batch, tasks, grown):
            if isinstance(tree, str):
                await self.streams.reject(d, PROMPT_GROUP, "engine_error", tree)
                continue
            self._stamp(tree, task)
            await self.streams.publish(keys.trees, tree)
            done.append(d.entry_id)
            served.append(task)
            trees.append(tree)
        await self.streams.ack(keys.prompts, PROMPT_GROUP, done)
        self.prompts_done += len(done)
        seconds = time.perf_counter() - started
        self.accounting.end_batch(served, trees, seconds, self.engine.policy_version)

    def _stamp(self, tree: TreeRollout, task: PromptTask) -> None:
        """Score the leaves and set the ids and the sampling settings the engine used."""
        name = task.task or self.settings.sampler.default_task
        check = reward_fn(name)
        for leaf in tree.leaves:
            text = self.decode_text(tree.response_tokens(leaf.node).tolist())
            try:
                leaf.reward = float(check(text, task.answer))
                if not math.isfinite(leaf.reward):
                    raise ValueError(f"returned {leaf.reward}")
            except Exception as exc:  # a user's reward function: one bad call scores one leaf
                log.warning("reward %s failed on prompt %s: %r", name, task.prompt_id, exc)
                self.metrics.reward_errors.inc()
                leaf.reward = WRONG
        tree.tree_id, tree.prompt_id = f"t-{task.prompt_id}", task.prompt_id
        tree.sampler_id, tree.dataset_position = self.worker_id, task.dataset_position
        tree.created_at = time.time()
        tree.temperature, tree.top_p = self.engine.options.temperature, self.engine.options.top_p

    async def _release(self, batch: list[Delivery]) -> None:
        """Hand unfinished prompts back to the group (best effort: Redis may be down too; then
        they are reclaimed after ``claim_idle_ms``)."""
        ids = [d.entry_id for d in batch]
        try:
            await self.streams.release(self.streams.keys.prompts, PROMPT_GROUP, self.worker_id, ids)
            log.info("stopping: released %d unfinished prompts", len(ids))
        except (TransportError, Stopping) as exc:
            log.warning("stopping: %d prompts not released (%s); reclaimed later", len(ids), exc)


# -- entry point ---------------------------------------------------------------------------------


def build_sampler(settings: SamplerSettings) -> Sampler:
    model = settings.sampler.model
    if not model or not Path(model).is_dir():
        raise ConfigError(f"TREEPO_SAMPLER__MODEL: {model!r} is not a model directory")
    try:
        reward_fn(settings.sampler.default_task)
    except ValueError as exc:
        raise ConfigError(f"TREEPO_SAMPLER__DEFAULT_TASK: {exc}") from None
    engine = VLLMSegmentGenerator(EngineOptions.from_settings(settings, model))
    tokenizer = engine.llm.get_tokenizer()
    return Sampler(settings, engine, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


SPEC = ProcessSpec(
    prog="treepo-sampler",
    description="TreePO sampler worker",
    settings=SamplerSettings,
    section="sampler",
    build=build_sampler,
    bound_flag="--max-prompts",
    bound_help="exit after this many prompts (bounded mode)",
    done="sampler exits after %d prompts",
)


def main(argv: list[str] | None = None) -> int:
    return process_main(SPEC, argv)


def run() -> None:
    """Console-script entry (``treepo-sampler``)."""
    exit_now(main)


if __name__ == "__main__":
    run()
