"""The sampler process: claims prompts, grows TreePO trees with vLLM, publishes them.

Loop: keep up to ``trees_in_flight`` trees growing. Claim PromptTasks for the free slots
(reclaiming dead samplers' entries first) and grow each tree in its own task on the shared
engine (``workers.trees``: unusable prompts are dead-lettered; a finished tree is scored,
XADDed as one TreeRollout and its prompt XACKed at once; ``pipeline.treepo.sampling``: every
path is an engine request, no barrier between trees or levels). Background tasks keep a heartbeat key alive and
follow the weight announcements (``workers.follow``), swapping verified weights into the engine
between two engine steps; before its first prompt the sampler takes the newest verified weights.
While the learner's announced version is more than ``max_staleness`` ahead of the engine's (a
download under way or failing), the sampler claims no new prompt: its tree would be dropped as
stale and its prompt's admissions used up; the prompts stay in the stream for other samplers.
SIGTERM stops at once, also in the middle of a tree or while Redis is down: the unfinished
prompts are handed back (``Streams.release``) and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.aio import Background, wait_or_stop
from pipeline.config import SamplerSettings
from pipeline.entry import ProcessSpec, exit_now, process_main
from pipeline.errors import ConfigError, Stopping
from pipeline.httpserver import make_app, start
from pipeline.treepo.tasks import reward_fn
from pipeline.weights.server import ServeCounters, WeightStore, add_routes
from pipeline.wire.streams import PROMPT_GROUP, TREE_GROUP, Delivery, Streams
from workers.accounting import Accounting
from workers.canary import CanaryFailed
from workers.engine import EngineOptions, VLLMPathGenerator
from workers.follow import WeightFollower
from workers.heartbeat import HeartbeatSender
from workers.metrics import SamplerMetrics
from workers.trees import TreeWork

HOLD_OFF_POLL_S = 0.05
"""How often a sampler held off by stale weights looks again (the swap is between steps)."""

log = logging.getLogger(__name__)


class Sampler:
    """One sampler worker around one engine. ``run`` is the process's main loop."""

    def __init__(
        self,
        settings: SamplerSettings,
        engine: VLLMPathGenerator,
        decode_text: Callable[[list[int]], str],
        metrics: SamplerMetrics | None = None,
    ) -> None:
        self.settings, self.engine, self.decode_text = settings, engine, decode_text
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
        self.work_dir = Path(opts.work_dir) / self.worker_id
        self.accounting = Accounting(self.metrics, self.work_dir / "summary.json")
        engine.meter.listeners.append(self.accounting.on_step)
        engine.meter.listeners.append(self._stepped)
        engine.meter.start_listeners.append(self.accounting.on_request_started)
        engine.meter.swap_listeners.append(self.accounting.on_swap)
        self._growing: dict[asyncio.Task[None], Delivery] = {}
        self._holding: list[Delivery] = []
        """Prompts read while the follower learned that the engine is too far behind."""
        self.follower = WeightFollower.for_sampler(
            settings, self.streams, engine, self.metrics, self.work_dir, self.worker_id
        )
        self.trees = TreeWork(
            settings, engine, self.streams, self.metrics, self.accounting, decode_text,
            self.worker_id, self.stop, self.follower.canary,
        )  # fmt: skip
        self.in_flight = self.trees.in_flight
        self.relay = ServeCounters()
        self.metrics.weight_bytes_relayed.set_function(lambda: self.relay.bytes_sent)
        self.heartbeat = HeartbeatSender(
            self.streams, self.worker_id, "sampler", lambda: engine.policy_version, self.stop,
            opts.heartbeat_ttl_s,
        )  # fmt: skip
        self.port = opts.port
        self.failed: BaseException | None = None
        self.progress_at = time.monotonic()
        """When the loop last finished an iteration (health: a stuck loop is not ok)."""
        self.metrics.policy_version.set(engine.policy_version)

    @property
    def prompts_done(self) -> int:
        """Trees published (each acknowledges its prompt)."""
        return self.trees.done

    # -- main loop -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop now: every growing tree is abandoned and its prompt handed back (signal-safe)."""
        self.stop.set()
        self.engine.request_stop()

    def close(self) -> None:
        """End the engine's processes (after ``run``)."""
        self.engine.close()

    def _stepped(self, _: object) -> None:
        """An engine step: the trees are progressing (health), also while no slot frees."""
        self.progress_at = time.monotonic()

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
        app = make_app(self.metrics.registry, self.health, {"run": self.settings.run.name})
        w = self.settings.weights
        if w.relay:  # serve the versions this sampler verified to its peers
            token = w.token.get_secret_value() if w.token else None
            add_routes(
                app, WeightStore(self.work_dir), token, slots=w.serve_slots, counters=self.relay
            )
        runner, self.port = await start(app, self.settings.sampler.host, self.settings.sampler.port)
        opts = self.settings.sampler
        self.follower.relay_url = (
            (opts.public_url or f"http://{opts.host}:{self.port}").rstrip("/") if w.relay else ""
        )
        log.info(
            "sampler %s serving /metrics on %s:%d",
            self.worker_id,
            self.settings.sampler.host,
            self.port,
        )
        background = Background(self._fail, self.stop.is_set)
        try:
            await self.follower.poll()  # the newest verified weights before the first prompt
            await self.follower.apply_staged()
            background.start("heartbeat", self.heartbeat.loop())
            background.start("claims", self._keep_claims())
            poll_s = self.settings.sampler.weights_poll_s
            background.start("weights", self.follower.follow(self.stop, poll_s))
            await self._loop(max_prompts)
        except Stopping as exc:
            log.info("stopping: %s", exc)
        except CanaryFailed as exc:  # the weights do not take in this engine: give up loudly
            log.error("stopping: %s", exc)
            self.failed = exc
        finally:
            self.stop.set()
            await background.close()
            self.write_summary()
            if self.follower.relay_url or self.follower.share is not None:
                with contextlib.suppress(Exception):  # best effort: a relay may just vanish
                    await self.streams.withdraw_weights(self.worker_id)
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
        """Keep up to ``trees_in_flight`` trees growing: claim prompts for the free slots, grow
        each tree in its own task, publish it the moment it is done, claim again."""
        growing: dict[asyncio.Task[None], Delivery] = {}
        self._growing = growing

        def wanted() -> int:  # asked before each read; 0 ends the claiming (bounded mode)
            self.progress_at = time.monotonic()
            free = self.in_flight - len(growing)
            if max_prompts is not None:
                free = min(free, max_prompts - self.prompts_done - len(growing))
            return free

        prompts = self.streams.consumer(
            self.streams.keys.prompts,
            PROMPT_GROUP,
            self.worker_id,
            count=wanted,
            stop=self.stop,
            reclaim_every_s=self.streams.default_reclaim_s,
        )
        idle_since: float | None = time.monotonic()
        try:
            while not self.stop.is_set():
                if growing and len(growing) >= self.in_flight:
                    await self.trees.settle(growing, asyncio.FIRST_COMPLETED)
                    continue
                if self.follower.too_far_behind():
                    await self._hold_off(growing)
                    continue
                try:
                    batch = await prompts.__anext__()
                except StopAsyncIteration:
                    break
                usable = self._holding = await self.trees.usable(batch)
                while usable and self.follower.too_far_behind() and not self.stop.is_set():
                    await self._hold_off(growing)  # read while the announcement came in
                self._holding = []
                if self.stop.is_set():
                    await self.trees.release(usable)
                    break
                for d in usable:
                    task = asyncio.create_task(self.trees.serve(d))
                    growing[task] = d
                    self.accounting.tree_started()
                if growing and idle_since is not None:
                    self.metrics.idle_seconds.inc(time.monotonic() - idle_since)
                    idle_since = None
                await self.trees.settle(growing, None)
                if not growing and idle_since is None:
                    idle_since = time.monotonic()
            while growing and not self.stop.is_set():  # bounded mode: finish what was claimed
                await self.trees.settle(growing, asyncio.FIRST_COMPLETED)
        finally:
            if growing:
                await self.trees.abandon(growing)

    async def _keep_claims(self) -> None:
        """Mark the prompts of the growing trees as in work every ``keep_every_s``: a tree may
        grow for longer than ``claim_idle_ms``, and an idle pending prompt is reclaimed (by any
        sampler, this one included) and grown twice."""
        s = self.streams
        while not await wait_or_stop(self.stop, s.keep_every_s):
            ids = [d.entry_id for d in [*self._growing.values(), *self._holding]]
            await s.keep(s.keys.prompts, PROMPT_GROUP, self.worker_id, ids)

    async def _hold_off(self, growing: dict[asyncio.Task[None], Delivery]) -> None:
        """Claim nothing for a moment: the learner is too far ahead of this engine's weights for
        a new tree to arrive in time (``WeightFollower.too_far_behind``); growing trees go on."""
        started = time.monotonic()
        self.progress_at = started  # waiting for weights is not being stuck
        await wait_or_stop(self.stop, HOLD_OFF_POLL_S)
        await self.trees.settle(growing, None)
        self.metrics.held_off_seconds.inc(time.monotonic() - started)


# -- entry point ---------------------------------------------------------------------------------


def build_sampler(settings: SamplerSettings) -> Sampler:
    model = settings.sampler.model
    if not model or not Path(model).is_dir():
        raise ConfigError(f"TREEPO_SAMPLER__MODEL: {model!r} is not a model directory")
    try:
        reward_fn(settings.sampler.default_task)
    except ValueError as exc:
        raise ConfigError(f"TREEPO_SAMPLER__DEFAULT_TASK: {exc}") from None
    engine = VLLMPathGenerator(EngineOptions.from_settings(settings, model))
    tokenizer = engine.tokenizer
    try:
        return Sampler(
            settings, engine, lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        )
    except ConfigError:
        engine.close()
        raise


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
