"""The sampler's bookkeeping: every engine call feeds the cost model and the call metrics; every
published batch adds its trees' counters and the engine-seconds it used against what independent
sampling of the same leaves would have cost; ``summary.json`` holds the final counters."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pipeline.costs import CostModel, independent_work
from pipeline.messages import PromptTask, TreeRollout
from workers.engine import CallStats
from workers.metrics import SamplerMetrics

log = logging.getLogger("workers.sampler")


class Accounting:
    def __init__(self, metrics: SamplerMetrics, summary: Path) -> None:
        self.metrics = metrics
        self.summary = summary
        self.cost = CostModel()
        self.calls: list[CallStats] = []
        """Engine calls of the batch in progress."""
        self.started = time.monotonic()

    def on_call(self, stats: CallStats) -> None:
        """One engine call (the engine's call listener)."""
        self.calls.append(stats)
        self.cost.observe(stats.work(), stats.seconds)
        m = self.metrics
        m.engine_calls.inc()
        m.generation_seconds.inc(stats.seconds)
        m.prefill_tokens.inc(stats.prefill_tokens)
        m.prefill_cached_tokens.inc(stats.cached_tokens)

    def begin_batch(self) -> None:
        self.calls = []

    def end_batch(
        self, tasks: list[PromptTask], trees: list[TreeRollout], seconds: float, version: int
    ) -> None:
        """The batch's published ``trees`` (of ``tasks``), grown in ``seconds``."""
        m = self.metrics
        used = sum(self.cost.estimate(c.work()) for c in self.calls)
        independent = self.cost.estimate(
            independent_work(
                [len(t.prompt_token_ids) for t in tasks],
                [[tree.response_length(leaf.node) for leaf in tree.leaves] for tree in trees],
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
            m.correct_leaves.inc(sum(1 for leaf in tree.leaves if leaf.reward > 0))
        rewards = [leaf.reward for tree in trees for leaf in tree.leaves]
        m.reward_mean.set(sum(rewards) / max(1, len(rewards)))
        m.batch_seconds.observe(seconds)
        self.write_summary(version)
        log.info(
            "published %d trees in %.2fs: %d leaves, decoded %d vs independent %d tokens, "
            "policy v%d",
            len(trees),
            seconds,
            sum(len(t.leaves) for t in trees),
            sum(t.stats.decoded_tokens for t in trees),
            sum(t.stats.independent_tokens for t in trees),
            version,
        )

    def write_summary(self, version: int) -> Path:
        """Every unlabelled counter of the sampler, wall seconds, the cost model and the policy
        version, as JSON."""
        values: dict[str, object] = {
            sample.name: sample.value
            for family in self.metrics.registry.collect()
            if family.type == "counter"
            for sample in family.samples
            if sample.name.endswith("_total") and not sample.labels
        }
        values["wall_seconds"] = time.monotonic() - self.started
        values["cost_model"] = list(self.cost.coef)
        values["policy_version"] = version
        self.summary.parent.mkdir(parents=True, exist_ok=True)
        self.summary.write_text(json.dumps(values, indent=2))
        return self.summary
