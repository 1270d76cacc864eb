"""The sampler's bookkeeping: every engine step feeds the cost model and the measured
engine-seconds; every published tree adds its counters and prices independent sampling of its
prompt with that model (``pipeline.treepo.costs``); ``summary.json`` holds the final counters.

Engine-seconds used are measured (the engine's busy wall time, step by step, and its weight
swaps). The independent side is a prediction: ``bench/tree_vs_independent.py`` checks it against
a real independent run. Weight swaps are on both sides: independent sampling would swap the same
weights (they are kept out of the steps the cost model is fitted on).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pipeline.treepo.costs import CostModel, StepConcurrency, Work, independent_work
from pipeline.wire.messages import PromptTask, TreeRollout
from workers.engine import StepStats, SwapStats
from workers.metrics import SamplerMetrics

log = logging.getLogger("workers.sampler")
T = TypeVar("T")


class InFlight:
    """Trees in flight (claimed, not yet done) now, and their average over wall time (the
    ``trees_in_flight`` gauge and the summary; pricing uses ``StepConcurrency``)."""

    def __init__(self) -> None:
        self.now = 0
        self.area = 0.0
        self.seconds = 0.0
        self.at = time.monotonic()

    def _advance(self) -> None:
        t = time.monotonic()
        if self.now:
            self.area += self.now * (t - self.at)
            self.seconds += t - self.at
        self.at = t

    def change(self, by: int) -> None:
        self._advance()
        self.now += by

    @property
    def mean(self) -> float:
        self._advance()
        return self.area / self.seconds if self.seconds > 0 else float(max(1, self.now))


class Accounting:
    def __init__(self, metrics: SamplerMetrics, summary: Path) -> None:
        self.metrics = metrics
        self.summary = summary
        self.cost = CostModel()
        self.in_flight = InFlight()
        self.concurrency = StepConcurrency()
        """Trees growing on the engine at each step (what prices independent steps)."""
        self.used_seconds = 0.0
        self.independent_seconds = 0.0
        self.swap_seconds = 0.0
        """Weight swaps, in both of the above."""
        self.independent = Work(0.0, 0.0, 0.0)
        """The priced independent work so far (for the summary)."""
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def on_step(self, step: StepStats) -> None:
        """One engine step (the engine meter's listener; runs on the engine's thread)."""
        m = self.metrics
        prefill = step.prefill_tokens + step.recomputed_tokens
        with self._lock:
            self.cost.observe(Work(prefill, step.decoded_tokens, 1), step.seconds)
            recompute_s = step.recomputed_tokens * self.cost.coef[0]
            self.concurrency.step()
            self.used_seconds += step.seconds
        m.engine_steps.inc()
        m.generation_seconds.inc(step.seconds)
        m.gpu_seconds_used.inc(step.seconds)
        m.prefill_tokens.inc(step.prefill_tokens + step.cached_tokens)
        m.prefill_cached_tokens.inc(step.cached_tokens)
        if step.recomputed_tokens:
            m.recomputed_tokens.inc(step.recomputed_tokens)
            m.recompute_seconds.inc(recompute_s)

    def on_swap(self, swap: SwapStats) -> None:
        """A weight swap (the engine meter's listener): engine time used, and time independent
        sampling would have used as well (it swaps the same weights), so it moves no saving.
        The context it drops is counted here; the engine's recomputing it, in the steps after
        (``on_step``)."""
        m, seconds = self.metrics, swap.seconds
        with self._lock:
            self.used_seconds += seconds
            self.independent_seconds += seconds
            self.swap_seconds += seconds
        m.gpu_seconds_used.inc(seconds)
        m.gpu_seconds_independent.inc(seconds)
        m.swap_load_seconds.inc(swap.load_seconds)
        m.swap_reset_seconds.inc(swap.reset_seconds)
        m.swap_dropped_tokens.inc(swap.dropped_tokens)

    def on_request_started(self, steps: int) -> None:
        """A request's first token, ``steps`` engine steps after it was submitted (the engine
        meter's listener)."""
        self.metrics.request_start_steps.observe(steps)

    async def growing(self, grow: Coroutine[Any, Any, T]) -> T:
        """``grow`` counted as growing on the engine while it runs (run it on the engine's
        loop: the engine's steps are counted there too)."""
        with self._lock:
            self.concurrency.started()
        try:
            return await grow
        finally:
            with self._lock:
                self.concurrency.ended()

    def tree_started(self) -> None:
        self.in_flight.change(+1)
        self.metrics.trees_in_flight.set(self.in_flight.now)

    def tree_ended(self) -> None:
        self.in_flight.change(-1)
        self.metrics.trees_in_flight.set(self.in_flight.now)

    def tree_published(self, task: PromptTask, tree: TreeRollout, seconds: float) -> None:
        """A published tree of ``task``, ``seconds`` after its prompt was claimed."""
        m = self.metrics
        longest = max((tree.response_length(leaf.node) for leaf in tree.leaves), default=0)
        with self._lock:
            work = independent_work(
                len(task.prompt_token_ids),
                len(tree.leaves),
                tree.mean_leaf_length(),
                longest,
                self.concurrency.mean,
            )
            independent = self.cost.estimate(work)
            self.independent += work
            self.independent_seconds += independent
            saved = self.independent_seconds - self.used_seconds
            coef = self.cost.coef
        m.gpu_seconds_independent.inc(independent)
        m.gpu_seconds_saved.set(saved)
        m.decode_tokens_per_second.set(1 / coef[1] if coef[1] > 0 else 0.0)
        m.prefill_tokens_per_second.set(1 / coef[0] if coef[0] > 0 else 0.0)
        m.step_fixed_seconds.set(coef[2])
        s = tree.stats
        m.trees.inc()
        m.tokens_decoded.inc(s.decoded_tokens)
        m.tokens_independent.inc(s.independent_tokens)
        m.engine_requests.inc(s.engine_calls)
        m.segments.inc(len(tree.nodes))
        m.leaves.inc(len(tree.leaves))
        m.fallbacks.inc(s.fallbacks)
        m.correct_leaves.inc(sum(1 for leaf in tree.leaves if leaf.reward > 0))
        rewards = [leaf.reward for leaf in tree.leaves]
        m.reward_mean.set(sum(rewards) / max(1, len(rewards)))
        m.time_to_publish_seconds.observe(seconds)
        log.debug(
            "published %s in %.2fs: %d leaves, decoded %d vs independent %d tokens",
            tree.tree_id,
            seconds,
            len(tree.leaves),
            s.decoded_tokens,
            s.independent_tokens,
        )

    def write_summary(self, version: int) -> Path:
        """Every unlabelled counter of the sampler, wall seconds, the cost model, time to
        publish, the policy version and how weight versions were taken (link, delta, full), as
        JSON."""
        values: dict[str, object] = {
            sample.name: sample.value
            for family in self.metrics.registry.collect()
            if family.type == "counter"
            for sample in family.samples
            if sample.name.endswith("_total") and not sample.labels
        }
        values["wall_seconds"] = time.monotonic() - self.started
        with self._lock:
            values["cost_model"] = list(self.cost.coef)
            values["independent_work"] = list(self.independent.vector())
            values["weight_swap_seconds"] = self.swap_seconds
        values["mean_trees_in_flight"] = self.in_flight.mean
        values["mean_trees_growing_per_step"] = self.concurrency.mean
        values["time_to_publish_seconds"] = self._publish_quantiles()
        values["request_start_steps"] = {
            s.name.rsplit("_", 1)[1]: s.value
            for s in self.metrics.request_start_steps.collect()[0].samples
            if s.name.endswith(("_sum", "_count"))
        }
        values["policy_version"] = version
        values["weight_fetches"] = {
            s.labels["method"]: s.value
            for s in self.metrics.weight_fetches.collect()[0].samples
            if s.name.endswith("_total")
        }
        self.summary.parent.mkdir(parents=True, exist_ok=True)
        self.summary.write_text(json.dumps(values, indent=2))
        return self.summary

    def _publish_quantiles(self) -> dict[str, float | None]:
        """p50 and p99 of time to publish, interpolated in the histogram's buckets."""
        samples = {
            s.labels["le"]: s.value
            for fam in self.metrics.registry.collect()
            if fam.name == "treepo_sampler_time_to_publish_seconds"
            for s in fam.samples
            if s.name.endswith("_bucket")
        }
        return {f"p{int(q * 100)}": bucket_quantile(samples, q) for q in (0.5, 0.99)}


def bucket_quantile(buckets: dict[str, float], q: float) -> float | None:
    """The q-quantile of a Prometheus histogram given as {le: cumulative count}, by linear
    interpolation inside the bucket (what PromQL's ``histogram_quantile`` does)."""
    edges = sorted(((float(le), n) for le, n in buckets.items()), key=lambda x: x[0])
    if not edges or edges[-1][1] <= 0:
        return None
    rank = q * edges[-1][1]
    low, below = 0.0, 0.0
    for le, n in edges:
        if n >= rank:
            if le == float("inf"):
                return low
            return low + (le - low) * ((rank - below) / (n - below) if n > below else 0.0)
        low, below = le, n
    return low
