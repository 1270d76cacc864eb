"""The life of one tree in a sampler: a claimed prompt is checked, grown on the engine, scored,
published and acknowledged; an unfinished one is handed back. ``TreeWork`` does this for the
sampler's loop (``workers.sampler``), which decides when to claim and how many trees grow.

How many trees may grow at once is ``trees_in_flight``, capped by what the engine's KV cache
holds when every tree grows to its full size (``fit_trees_to_kv``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import SamplerSettings
from pipeline.errors import ConfigError, Stopping, TransportError
from pipeline.seeds import derived_seed, sampler_key
from pipeline.treepo.rewards import WRONG
from pipeline.treepo.sampling import TreeSampler
from pipeline.treepo.tasks import reward_fn
from pipeline.wire.messages import PromptTask, TreeRollout
from pipeline.wire.streams import PROMPT_GROUP, Delivery, Streams
from workers.accounting import Accounting
from workers.canary import CanaryCheck
from workers.engine import GenerationStopped, VLLMPathGenerator, trees_that_fit
from workers.metrics import SamplerMetrics
from workers.prompts import prompt_problem

log = logging.getLogger(__name__)

PROMPT_ALLOWANCE = 512
"""Prompt tokens allowed for per tree when sizing trees in flight by the KV cache (the paths of
a tree share their prompt's blocks through the prefix cache)."""


def tree_rng(settings: SamplerSettings) -> random.Random:
    """The sampler's generator of tree shapes (random root fan-out), from the run's seed."""
    o = settings.sampler
    return random.Random(derived_seed(settings.run.seed, "tree", sampler_key(o.worker_id, o.port)))


def check_segments(segment_tokens: int, block_size: int, allowed: bool) -> None:
    """Refuse segments shorter than the engine's KV block unless allowed (one line naming both
    settings): every new sibling would compute part of its parent's context again."""
    if segment_tokens >= block_size:
        return
    message = (
        f"TREEPO_TREE__SEGMENT_TOKENS={segment_tokens} is shorter than the engine's KV block "
        f"({block_size} tokens, TREEPO_SAMPLER__BLOCK_SIZE): each new sibling would compute up "
        f"to {block_size - 1} tokens of its parent's context again"
    )
    if not allowed:
        raise ConfigError(
            message + "; use segments of at least one block, or set "
            "TREEPO_SAMPLER__ALLOW_SHORT_SEGMENTS=true to accept the cost"
        )
    log.warning("%s (allowed by TREEPO_SAMPLER__ALLOW_SHORT_SEGMENTS)", message)


class TreeWork:
    """Grows, scores and publishes the trees of one sampler (``done`` counts the published)."""

    def __init__(
        self,
        settings: SamplerSettings,
        engine: VLLMPathGenerator,
        streams: Streams,
        metrics: SamplerMetrics,
        accounting: Accounting,
        decode_text: Callable[[list[int]], str],
        worker_id: str,
        stop: asyncio.Event,
        canary: CanaryCheck,
    ) -> None:
        self.settings, self.engine, self.streams = settings, engine, streams
        self.metrics, self.accounting, self.decode_text = metrics, accounting, decode_text
        self.worker_id, self.stop, self.canary = worker_id, stop, canary
        opts, tree_cfg = settings.sampler, settings.tree
        check_segments(tree_cfg.segment_tokens, engine.block_size, opts.allow_short_segments)
        if tree_cfg.eos_token_id is None and engine.eos_token_id is not None:
            tree_cfg = tree_cfg.model_copy(update={"eos_token_id": engine.eos_token_id})
        self.tree_sampler = TreeSampler(
            engine, tree_cfg, rng=tree_rng(settings), decode=decode_text
        )
        self.in_flight = self._trees_in_flight(tree_cfg)
        self.done = 0

    def _trees_in_flight(self, tree: Any) -> int:
        """``trees_in_flight``, capped by the engine's KV capacity (``fit_trees_to_kv``)."""
        wanted = self.settings.sampler.trees_in_flight
        if not self.settings.sampler.fit_trees_to_kv:
            return wanted
        response = tree.max_response_tokens or tree.segment_tokens * tree.max_depth
        tree_tokens = tree.width * response + PROMPT_ALLOWANCE
        fit = trees_that_fit(wanted, getattr(self.engine, "kv_tokens", 0), tree_tokens)
        if fit < wanted:
            log.info(
                "trees in flight %d, not %d: the KV cache holds %d tokens and a full tree %d "
                "(TREEPO_SAMPLER__FIT_TREES_TO_KV=false to keep %d)",
                fit, wanted, self.engine.kv_tokens, tree_tokens, wanted,
            )  # fmt: skip
        return fit

    async def settle(self, growing: dict[asyncio.Task[None], Delivery], wait: str | None) -> None:
        """Forget finished tree tasks (waiting for one with ``FIRST_COMPLETED``, or until stop);
        a tree task's unexpected error is the sampler's."""
        if wait is not None:
            stopped = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait([*growing, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
        for task in [t for t in growing if t.done()]:
            growing.pop(task)
            self.accounting.tree_ended()
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, (Stopping, GenerationStopped)):
                raise error

    async def abandon(self, growing: dict[asyncio.Task[None], Delivery]) -> None:
        """Stop every growing tree and hand its prompt back."""
        for task in growing:
            task.cancel()
        await asyncio.gather(*growing, return_exceptions=True)
        unfinished = [d for t, d in growing.items() if not self.published(t)]
        for _ in growing:
            self.accounting.tree_ended()
        growing.clear()
        await self.release(unfinished)

    @staticmethod
    def published(task: asyncio.Task[None]) -> bool:
        return task.done() and not task.cancelled() and task.exception() is None

    async def usable(self, batch: list[Delivery]) -> list[Delivery]:
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

    async def serve(self, d: Delivery) -> None:
        """Grow, score and publish one tree, then ack its prompt."""
        task: PromptTask = d.message  # type: ignore[assignment]
        claimed = time.perf_counter()
        if task.created_at > 0:
            self.metrics.prompt_wait_seconds.observe(max(0.0, time.time() - task.created_at))
        failed_swaps = self.canary.failures
        try:
            tree = await self.engine.call(
                self.accounting.growing(self.tree_sampler.grow(task.prompt_token_ids))
            )
            await self.canary.gate.wait()  # the swaps its tokens came after are proven
        except GenerationStopped as exc:
            raise Stopping(str(exc)) from exc
        except (ValueError, TypeError) as exc:  # the engine refused the request
            log.error("engine refused prompt %s: %s", task.prompt_id, exc)
            await self.streams.reject(
                d, PROMPT_GROUP, "engine_error", f"{type(exc).__name__}: {exc}"
            )
            return
        if self.canary.failures != failed_swaps:  # tokens not from the version they say
            self.metrics.canary_dropped_trees.inc()
            await self.release([d])
            return
        self.stamp(tree, task)
        await self.streams.publish(self.streams.keys.trees, tree)
        await self.streams.ack(self.streams.keys.prompts, PROMPT_GROUP, [d.entry_id])
        self.done += 1
        self.accounting.tree_published(task, tree, time.perf_counter() - claimed)

    def stamp(self, tree: TreeRollout, task: PromptTask) -> None:
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

    async def release(self, batch: list[Delivery]) -> None:
        """Hand unfinished prompts back to the group (best effort: Redis may be down too; then
        they are reclaimed after ``claim_idle_ms``)."""
        ids = [d.entry_id for d in batch]
        if not ids:
            return
        try:
            await self.streams.release(self.streams.keys.prompts, PROMPT_GROUP, self.worker_id, ids)
            log.info("stopping: released %d unfinished prompts", len(ids))
        except (TransportError, Stopping) as exc:
            log.warning("stopping: %d prompts not released (%s); reclaimed later", len(ids), exc)
