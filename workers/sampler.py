"""The sampler process: claims prompts, grows TreePO trees with vLLM, publishes them.

Loop: swap in staged weights -> if more than ``max_staleness`` versions behind the latest
announcement, wait -> claim up to ``batch_prompts`` PromptTasks (reclaiming dead samplers'
entries first) -> grow one tree per prompt (one engine call per segment step) -> score leaves ->
XADD one TreeRollout per prompt -> XACK the prompts. Background tasks keep a heartbeat key alive
and watch the weight announcement key, downloading and verifying new versions. SIGTERM stops the
loop at the next segment step, hands the unfinished prompts back (``Streams.release``) and exits.

What the learner does with the trees is in ``learner/``; the algorithm is ``pipeline.sampling``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.aio import wait_or_stop
from pipeline.config import SamplerSettings
from pipeline.costs import CostModel, independent_work
from pipeline.entry import process_parser, process_settings, serve
from pipeline.errors import (
    ConfigError,
    MessageDecodeError,
    WeightDownloadError,
    WeightVerificationError,
)
from pipeline.httpserver import make_app, start
from pipeline.messages import Heartbeat, PromptTask, WeightAnnouncement, decode_as, encode
from pipeline.sampling import TreeSampler
from pipeline.streams import Delivery, Streams
from pipeline.tasks import reward_fn
from pipeline.tree import Tree
from pipeline.weights import download_version, tensor_specs
from workers.engine import CallStats, EngineOptions, GenerationStopped, VLLMSegmentGenerator
from workers.metrics import SamplerMetrics

log = logging.getLogger(__name__)

PROMPT_GROUP = "samplers"
TREE_GROUP = "learner"


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
        self.started = time.monotonic()
        self.streams = Streams(settings.redis, settings.run, settings.streams)
        tree_cfg = settings.tree
        if tree_cfg.eos_token_id is None and engine.eos_token_id is not None:
            tree_cfg = tree_cfg.model_copy(update={"eos_token_id": engine.eos_token_id})
        self.tree_sampler = TreeSampler(
            engine, tree_cfg, rng=random.Random(f"{settings.run.seed}-{self.worker_id}")
        )
        self.cost = CostModel()
        self.calls: list[CallStats] = []
        engine.on_call = self._on_call  # type: ignore[method-assign]
        self.stop = asyncio.Event()
        self.latest_announced = 0
        self.staged_version = engine.policy_version
        self.rejected: set[int] = set()
        self.reference_specs = tensor_specs(Path(engine.options.model))
        self.work_dir = Path(opts.work_dir) / self.worker_id
        self.prompts_done = 0
        self.port = opts.port
        self.failed: BaseException | None = None
        self._deadletters_seen = 0
        self.metrics.policy_version.set(engine.policy_version)

    # -- engine hooks ----------------------------------------------------------------------------

    def _on_call(self, stats: CallStats) -> None:
        self.calls.append(stats)
        self.cost.observe(stats.work(), stats.seconds)
        m = self.metrics
        m.engine_calls.inc()
        m.generation_seconds.inc(stats.seconds)
        m.prefill_tokens.inc(stats.prefill_tokens)
        m.prefill_cached_tokens.inc(stats.cached_tokens)

    # -- main loop -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop at the next segment step (signal-safe)."""
        self.stop.set()
        self.engine.stop.set()

    def health(self) -> dict[str, Any]:
        return {
            "ok": not self.stop.is_set(),
            "worker_id": self.worker_id,
            "policy_version": self.engine.policy_version,
            "prompts_done": self.prompts_done,
        }

    async def run(self, max_prompts: int | None = None) -> int:
        """Serve until stopped (or ``max_prompts`` prompts are done); returns prompts done."""
        keys = self.streams.keys
        self.started = time.monotonic()
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
        background = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._weights_loop(), name="weights"),
        ]
        for task in background:
            task.add_done_callback(self._supervise)
        try:
            await self._loop(max_prompts)
        finally:
            self.stop.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self.write_summary()
            await self._heartbeat("stopped", ttl=self.settings.sampler.heartbeat_ttl_s, retry=False)
            await runner.cleanup()
            await self.streams.close()
        return self.prompts_done

    def write_summary(self) -> Path:
        """Final counters of this sampler as JSON (``<work_dir>/<worker>/summary.json``)."""
        import json

        m = self.metrics
        values = {
            name: m.registry.get_sample_value(name) or 0.0
            for name in (
                "treepo_sampler_trees_total",
                "treepo_sampler_leaves_total",
                "treepo_sampler_tokens_decoded_total",
                "treepo_sampler_tokens_independent_total",
                "treepo_sampler_prefill_tokens_total",
                "treepo_sampler_engine_calls_total",
                "treepo_sampler_generation_seconds_total",
                "treepo_sampler_gpu_seconds_used_total",
                "treepo_sampler_gpu_seconds_independent_total",
                "treepo_sampler_weight_swaps_total",
                "treepo_sampler_correct_leaves_total",
                "treepo_sampler_idle_seconds_total",
                "treepo_sampler_stale_waits_total",
            )
        }
        values["wall_seconds"] = time.monotonic() - self.started
        values["cost_model"] = list(self.cost.coef)
        values["policy_version"] = self.engine.policy_version
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / "summary.json"
        path.write_text(json.dumps(values, indent=2))
        return path

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s died: %r; stopping", task.get_name(), task.exception())
            self.request_stop()
            self.failed = task.exception()

    async def _loop(self, max_prompts: int | None) -> None:
        keys, opts = self.streams.keys, self.settings.sampler
        last_reclaim = 0.0
        while not self.stop.is_set():
            if max_prompts is not None and self.prompts_done >= max_prompts:
                return
            await self._apply_staged()
            if self._too_stale():
                self.metrics.stale_waits.inc()
                await self._idle(opts.weights_poll_s)
                continue
            count = opts.batch_prompts
            if max_prompts is not None:
                count = min(count, max_prompts - self.prompts_done)
            waited = time.monotonic()
            batch: list[Delivery] = []
            if time.monotonic() - last_reclaim > self.settings.streams.claim_idle_ms / 2000:
                last_reclaim = time.monotonic()
                batch = await self.streams.reclaim(
                    keys.prompts, PROMPT_GROUP, self.worker_id, count=count
                )
            if not batch:
                batch = await self.streams.read(keys.prompts, PROMPT_GROUP, self.worker_id, count)
            self._count_deadletters()
            if not batch:
                self.metrics.idle_seconds.inc(time.monotonic() - waited)
                continue
            await self._serve(batch)

    def _count_deadletters(self) -> None:
        total = self.streams.counters.deadlettered
        self.metrics.deadletter.inc(total - self._deadletters_seen)
        self._deadletters_seen = total

    async def _idle(self, seconds: float) -> None:
        started = time.monotonic()
        await wait_or_stop(self.stop, seconds)
        self.metrics.idle_seconds.inc(time.monotonic() - started)

    def _too_stale(self) -> bool:
        behind = self.latest_announced - self.engine.policy_version
        return behind > self.settings.run.max_staleness

    async def _serve(self, batch: list[Delivery]) -> None:
        keys = self.streams.keys
        tasks: list[PromptTask] = [d.message for d in batch]  # type: ignore[misc]
        now = time.time()
        for t in tasks:
            if t.created_at > 0:
                self.metrics.prompt_wait_seconds.observe(max(0.0, now - t.created_at))
        started = time.perf_counter()
        self.calls = []
        try:
            trees = await self.tree_sampler.expand([t.prompt_token_ids for t in tasks])
        except GenerationStopped:
            await self.streams.release(
                keys.prompts, PROMPT_GROUP, self.worker_id, [d.entry_id for d in batch]
            )
            log.info("stopping: released %d unfinished prompts", len(batch))
            return
        for task, tree in zip(tasks, trees):
            self._score(task, tree)
            rollout = tree.to_rollout(
                f"t-{task.prompt_id}",
                task.prompt_id,
                self.worker_id,
                task.dataset_position,
                time.time(),
            )
            await self.streams.publish(keys.trees, rollout)
        await self.streams.ack(keys.prompts, PROMPT_GROUP, [d.entry_id for d in batch])
        self.prompts_done += len(batch)
        self._account(tasks, trees, time.perf_counter() - started)

    def _score(self, task: PromptTask, tree: Tree) -> None:
        check = reward_fn(task.task or self.settings.sampler.default_task)
        for leaf in tree.leaves:
            leaf.reward = check(self.decode_text(leaf.response_token_ids), task.answer)

    def _account(self, tasks: list[PromptTask], trees: list[Tree], seconds: float) -> None:
        m = self.metrics
        used = sum(self.cost.estimate(c.work()) for c in self.calls)
        independent = self.cost.estimate(
            independent_work(
                [len(t.prompt_token_ids) for t in tasks],
                [[len(leaf.response_token_ids) for leaf in tree.leaves] for tree in trees],
            )
        )
        m.gpu_seconds_used.inc(used)
        m.gpu_seconds_independent.inc(independent)
        m.gpu_seconds_saved.inc(independent - used)
        m.decode_tokens_per_second.set(self.cost.decode_tokens_per_second)
        m.prefill_tokens_per_second.set(self.cost.prefill_tokens_per_second)
        for tree in trees:
            s = tree.stats
            m.trees.inc()
            m.tokens_decoded.inc(s.decoded_tokens)
            m.tokens_independent.inc(s.independent_tokens)
            m.segments.inc(len(tree.nodes))
            m.leaves.inc(len(tree.leaves))
            m.fallbacks.inc(s.fallbacks)
            m.correct_leaves.inc(sum(1 for leaf in tree.leaves if (leaf.reward or 0.0) > 0))
        rewards = [leaf.reward or 0.0 for tree in trees for leaf in tree.leaves]
        m.reward_mean.set(sum(rewards) / max(1, len(rewards)))
        m.batch_seconds.observe(seconds)
        self.write_summary()
        log.info(
            "published %d trees in %.2fs: %d leaves, decoded %d vs independent %d tokens, "
            "policy v%d",
            len(trees),
            seconds,
            sum(len(t.leaves) for t in trees),
            sum(t.stats.decoded_tokens for t in trees),
            sum(t.stats.independent_tokens for t in trees),
            self.engine.policy_version,
        )

    # -- weights ---------------------------------------------------------------------------------

    async def _apply_staged(self) -> None:
        seconds = await asyncio.to_thread(self.engine.swap_now)
        if seconds is not None:
            self.metrics.weight_swap_seconds.observe(seconds)
            self.metrics.weight_swaps.inc()
            self._prune_versions()
        self.metrics.policy_version.set(self.engine.policy_version)

    async def _weights_loop(self) -> None:
        while not self.stop.is_set():
            raw = await self.streams.call(
                lambda: self.streams.client.get(self.streams.keys.weights), "GET weights"
            )
            if raw:
                try:
                    ann = decode_as(raw, WeightAnnouncement)
                except MessageDecodeError as exc:
                    log.error("bad weight announcement ignored: %s", exc)
                else:
                    await self._maybe_fetch(ann)
            await wait_or_stop(self.stop, self.settings.sampler.weights_poll_s)

    async def _maybe_fetch(self, ann: WeightAnnouncement) -> None:
        self.latest_announced = max(self.latest_announced, ann.version)
        if ann.version <= self.staged_version or ann.version in self.rejected:
            return
        token = self.settings.weights.token
        started = time.perf_counter()
        try:
            _, directory = await download_version(
                ann.url,
                ann.manifest_sha256,
                self.work_dir,
                reference=self.reference_specs,
                token=token.get_secret_value() if token else None,
                timeout_s=self.settings.weights.download_timeout_s,
            )
        except WeightDownloadError as exc:
            log.warning("weights v%d not fetched yet (%s); will retry", ann.version, exc)
            return
        except WeightVerificationError as exc:
            self.rejected.add(ann.version)
            self.metrics.weight_rejected.inc()
            log.error(
                "refused weights v%d from %s: %s (keeping v%d)",
                ann.version,
                ann.url,
                exc,
                self.engine.policy_version,
            )
            return
        self.metrics.weight_download_seconds.observe(time.perf_counter() - started)
        self.engine.stage_weights(ann.version, directory)
        self.staged_version = ann.version

    def _prune_versions(self) -> None:
        """Delete downloaded versions older than the one the engine runs (never the staged one,
        nor one a swap may be reading)."""
        current = self.engine.policy_version
        for d in self.work_dir.glob("v*"):
            if d.name[1:].isdigit() and int(d.name[1:]) < current:
                shutil.rmtree(d, ignore_errors=True)

    # -- heartbeat -------------------------------------------------------------------------------

    async def _heartbeat(self, state: str, ttl: float, retry: bool = True) -> None:
        hb = Heartbeat(
            self.worker_id,
            "sampler",
            socket.gethostname(),
            os.getpid(),
            self.engine.policy_version,
            time.time(),
            state,
        )
        key = self.streams.keys.heartbeat_prefix + self.worker_id
        payload = encode(hb)
        if retry:
            await self.streams.call(
                lambda: self.streams.client.set(key, payload, px=int(ttl * 1000)), "SET heartbeat"
            )
            return
        try:  # the last heartbeat on shutdown: one attempt, Redis may be stopping too
            await asyncio.wait_for(self.streams.client.set(key, payload, px=int(ttl * 1000)), 1.0)
        except Exception as exc:
            log.info("final heartbeat not sent: %s", exc)

    async def _heartbeat_loop(self) -> None:
        ttl = self.settings.sampler.heartbeat_ttl_s
        while not self.stop.is_set():
            await self._heartbeat("running", ttl)
            await wait_or_stop(self.stop, ttl / 3)


# -- entry point ---------------------------------------------------------------------------------


def engine_options(settings: SamplerSettings, model: str) -> EngineOptions:
    o = settings.sampler
    return EngineOptions(
        model=model,
        temperature=o.temperature,
        top_p=o.top_p,
        dtype=o.dtype,
        gpu_memory_utilization=o.gpu_memory_utilization,
        enforce_eager=o.enforce_eager,
        max_model_len=o.max_model_len or None,
        kv_cache_gib=o.kv_cache_gib,
        block_size=o.block_size,
        seed=settings.run.seed,
    )


def build_sampler(settings: SamplerSettings) -> Sampler:
    model = settings.sampler.model
    if not model or not Path(model).is_dir():
        raise ConfigError(f"TREEPO_SAMPLER__MODEL: {model!r} is not a model directory")
    engine = VLLMSegmentGenerator(engine_options(settings, model))
    tokenizer = engine.llm.get_tokenizer()
    return Sampler(settings, engine, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("treepo-sampler", "TreePO sampler worker")
    parser.add_argument(
        "--max-prompts", type=int, help="exit after this many prompts (bounded mode)"
    )
    args = parser.parse_args(argv)
    try:
        sampler = build_sampler(process_settings(SamplerSettings, "sampler", args))
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        done = serve(lambda: sampler.run(args.max_prompts), sampler.request_stop)
    finally:
        sampler.engine.close()
    log.info("sampler %s exits after %d prompts", sampler.worker_id, done)
    return 1 if sampler.failed is not None else 0


def run() -> None:
    """Console-script entry: ``main()``, then exit at once. Everything was shut down in order;
    skipping the interpreter's slow teardown of vLLM/torch keeps SIGTERM-to-exit under 5 s."""
    code = main()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
