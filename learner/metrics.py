"""Prometheus metrics of the learner process, on an explicit registry (``treepo_learner_*``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.httpserver import deadletter_counter

if TYPE_CHECKING:
    from learner.steplog import StepRecord


@dataclass
class LearnerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        p = "treepo_learner_"
        self.steps = Counter(p + "steps", "Optimizer steps taken (learner steps).", registry=r)
        self.step_seconds = Histogram(
            p + "step_seconds",
            "Seconds of one learner step (update only).",
            buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.wait_seconds = Counter(
            p + "wait_seconds", "Seconds spent waiting for trees.", registry=r
        )
        self.tokens_trained = Counter(
            p + "tokens_trained", "Response tokens trained on.", registry=r
        )
        self.tokens_per_second = Gauge(
            p + "tokens_per_second", "Trained tokens per second of the last step.", registry=r
        )
        self.tokens_computed = Counter(
            p + "tokens_computed",
            "Token positions the learner's forward passes computed (packed: each tree token once).",
            registry=r,
        )
        self.tokens_per_leaf = Counter(
            p + "tokens_per_leaf",
            "Token positions one row per leaf would have computed for the same passes.",
            registry=r,
        )
        self.seconds_saved = Gauge(
            p + "seconds_saved",
            "Estimated learner seconds tree packing saved against one row per leaf, cumulative "
            "(each step's seconds x (per-leaf tokens / computed tokens - 1); negative if slower).",
            registry=r,
        )
        self.trees_consumed = Counter(
            p + "trees_consumed", "Trees read from the stream.", registry=r
        )
        self.trees_trained = Counter(p + "trees_trained", "Trees used in an update.", registry=r)
        self.trees_dropped_stale = Counter(
            p + "trees_dropped_stale", "Trees dropped for exceeding max_staleness.", registry=r
        )
        self.trees_dropped_no_signal = Counter(
            p + "trees_dropped_no_signal",
            "Trees dropped because all leaves had one reward.",
            registry=r,
        )
        self.trees_duplicate = Counter(
            p + "trees_duplicate", "Trees skipped because their id was already trained.", registry=r
        )
        self.staleness = Histogram(
            p + "staleness_versions",
            "Policy versions a trained tree lagged behind.",
            buckets=(0, 1, 2, 3, 4, 6, 8, 16),
            registry=r,
        )
        self.is_weight_mean = Gauge(
            p + "is_weight_mean", "Mean behavior importance weight pi_prox/mu.", registry=r
        )
        self.is_truncated_fraction = Gauge(
            p + "is_truncated_fraction",
            "Fraction of tokens whose importance weight was truncated.",
            registry=r,
        )
        self.is_ess = Gauge(
            p + "is_ess", "Normalised effective sample size of the importance weights.", registry=r
        )
        self.clip_fraction = Gauge(
            p + "clip_fraction", "Fraction of tokens where the PPO clip engaged.", registry=r
        )
        self.reward_mean = Gauge(
            p + "reward_mean", "Mean leaf reward of the last batch.", registry=r
        )
        self.accuracy = Gauge(
            p + "accuracy", "Fraction of leaves with positive reward in the last batch.", registry=r
        )
        self.loss = Gauge(p + "loss", "Policy loss of the last step.", registry=r)
        self.grad_norm = Gauge(p + "grad_norm", "Gradient norm of the last step.", registry=r)
        self.policy_version = Gauge(
            p + "policy_version", "Current policy version (optimizer steps).", registry=r
        )
        self.stream_lag = Gauge(
            p + "stream_lag", "Trees in the stream not yet read by the learner.", registry=r
        )
        self.stream_pending = Gauge(
            p + "stream_pending", "Trees read but not yet acknowledged.", registry=r
        )
        self.prompts_admitted = Counter(
            p + "prompts_admitted", "Prompts admitted to the prompts stream.", registry=r
        )
        self.prompts_too_long = Counter(
            p + "prompts_too_long",
            "Dataset prompts skipped at admission: longer than max_prompt_tokens.",
            registry=r,
        )
        self.prompts_readmitted = Counter(
            p + "prompts_readmitted",
            "Prompts admitted again: their tree was overdue (lost) or dropped as stale.",
            ["why"],
            registry=r,
        )
        for why in ("overdue", "stale"):
            self.prompts_readmitted.labels(why)
        self.prompts_abandoned = Counter(
            p + "prompts_abandoned",
            "Prompts given up after max_admissions admissions (or stale with readmission off).",
            registry=r,
        )
        self.deadletter = deadletter_counter(p, "Tree entries", r)
        self.prompts_in_flight = Gauge(
            p + "prompts_in_flight", "Prompts admitted but not yet trained on.", registry=r
        )
        self.publish_seconds = Histogram(
            p + "publish_seconds",
            "Seconds to export and announce weights.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=r,
        )
        self.publish_bytes = Counter(p + "publish_bytes", "Bytes of weights published.", registry=r)
        self.publish_delta_bytes = Counter(
            p + "publish_delta_bytes",
            "Bytes of the deltas offered with published versions (receivers at the previous "
            "version fetch these instead of the full files).",
            registry=r,
        )
        self.eval_accuracy = Gauge(
            p + "eval_accuracy",
            "Greedy accuracy of the newest published policy on the evaluation split.",
            registry=r,
        )
        self.eval_seconds = Histogram(
            p + "eval_seconds",
            "Seconds one held-out evaluation took.",
            buckets=(1, 5, 10, 30, 60, 300, 1800),
            registry=r,
        )
        self.weight_bytes_served = Gauge(
            p + "weight_bytes_served",
            "Weight bytes the learner's server sent (manifests and files, all versions).",
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            p + "checkpoint_seconds",
            "Seconds to write a checkpoint.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=r,
        )

    def observe_step(self, r: StepRecord, lags: list[int], tokens: float) -> None:
        """One learner step: its record, each trained tree's staleness, tokens trained."""
        self.steps.inc()
        self.step_seconds.observe(r.seconds)
        self.tokens_trained.inc(tokens)
        self.tokens_computed.inc(r.tokens_computed)
        self.tokens_per_leaf.inc(r.tokens_per_leaf)
        if r.tokens_computed:
            self.seconds_saved.inc(r.seconds * (r.tokens_per_leaf / r.tokens_computed - 1))
        self.tokens_per_second.set(r.tokens_per_second)
        self.trees_trained.inc(r.trees)
        for lag in lags:
            self.staleness.observe(lag)
        self.is_weight_mean.set(r.is_weight_mean)
        self.is_truncated_fraction.set(r.is_truncated_fraction)
        self.is_ess.set(r.is_ess)
        self.clip_fraction.set(r.clip_fraction)
        self.reward_mean.set(r.reward)
        self.accuracy.set(r.accuracy)
        self.loss.set(r.loss)
        self.grad_norm.set(r.grad_norm)
        self.policy_version.set(r.version)
