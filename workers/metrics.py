"""Prometheus metrics of the sampler process, on an explicit registry.

Names follow ``treepo_sampler_<what>_<unit>``; labels are never prompt or tree ids. The savings
of tree sampling are readable straight from counters: ``1 - tokens_decoded / tokens_independent``
and ``gpu_seconds_independent - gpu_seconds_used`` (used is measured, independent is priced by
the cost model of ``pipeline.treepo.costs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.httpserver import deadletter_counter


@dataclass
class SamplerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        p = "treepo_sampler_"
        self.reward_errors = Counter(
            p + "reward_errors",
            "Leaves whose reward function raised or returned a non-number (scored -1).",
            registry=r,
        )
        self.tokens_decoded = Counter(
            p + "tokens_decoded", "Tokens decoded by tree sampling.", registry=r
        )
        self.tokens_independent = Counter(
            p + "tokens_independent",
            "Tokens as many independent samples as the trees' leaves are expected to decode "
            "(probability-weighted leaf lengths).",
            registry=r,
        )
        self.prefill_tokens = Counter(
            p + "prefill_tokens", "Context tokens submitted to the engine.", registry=r
        )
        self.prefill_cached_tokens = Counter(
            p + "prefill_cached_tokens",
            "Submitted context tokens served by the prefix cache.",
            registry=r,
        )
        self.segments = Counter(p + "segments", "Segments (tree nodes) generated.", registry=r)
        self.trees = Counter(p + "trees", "Trees published.", registry=r)
        self.leaves = Counter(p + "leaves", "Leaves published.", registry=r)
        self.reward_mean = Gauge(
            p + "reward_mean", "Mean leaf reward of the last batch.", registry=r
        )
        self.correct_leaves = Counter(
            p + "correct_leaves", "Leaves with a positive reward.", registry=r
        )
        self.engine_requests = Counter(
            p + "engine_requests",
            "Engine requests opened (root paths, forked siblings, fallback forks).",
            registry=r,
        )
        self.engine_steps = Counter(
            p + "engine_steps", "Engine steps (forward passes) while requests ran.", registry=r
        )
        self.fallbacks = Counter(p + "fallbacks", "Fallback forks used.", registry=r)
        self.generation_seconds = Counter(
            p + "generation_seconds",
            "Wall seconds the engine was busy (requests in flight), step by step.",
            registry=r,
        )
        self.gpu_seconds_used = Counter(
            p + "gpu_seconds_used",
            "Device-seconds tree sampling used (measured: the engine's busy seconds and its "
            "weight swaps).",
            registry=r,
        )
        self.gpu_seconds_independent = Counter(
            p + "gpu_seconds_independent",
            "Device-seconds independent sampling of the published trees' prompts would use "
            "(cost model fitted on this engine's steps, plus the same weight swaps).",
            registry=r,
        )
        self.gpu_seconds_saved = Gauge(
            p + "gpu_seconds_saved",
            "Cumulative device-seconds saved by tree sampling (independent - used).",
            registry=r,
        )
        self.step_fixed_seconds = Gauge(
            p + "step_fixed_seconds", "Fitted fixed cost of one engine step.", registry=r
        )
        self.trees_in_flight = Gauge(p + "trees_in_flight", "Trees growing now.", registry=r)
        self.decode_tokens_per_second = Gauge(
            p + "decode_tokens_per_second", "Fitted decode throughput of this engine.", registry=r
        )
        self.prefill_tokens_per_second = Gauge(
            p + "prefill_tokens_per_second", "Fitted prefill throughput of this engine.", registry=r
        )
        self.policy_version = Gauge(
            p + "policy_version", "Policy version loaded in the engine.", registry=r
        )
        self.weight_swap_seconds = Histogram(
            p + "weight_swap_seconds",
            "Seconds to swap new weights into the engine.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=r,
        )
        self.weight_download_seconds = Histogram(
            p + "weight_download_seconds",
            "Seconds to download and verify one weight version.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
            registry=r,
        )
        self.weight_swaps = Counter(p + "weight_swaps", "Weight versions swapped in.", registry=r)
        self.canary_mismatch = Gauge(
            p + "canary_mismatch",
            "Mean absolute difference (nats) of the engine's and the learner's log-probs of the "
            "last swapped version's canary (the train/inference mismatch).",
            registry=r,
        )
        self.canary_mismatch.set(math.nan)
        self.canary_failures = Counter(
            p + "canary_failures", "Weight swaps whose canary did not match.", registry=r
        )
        self.canary_dropped_trees = Counter(
            p + "canary_dropped_trees",
            "Trees not published because a swap during their growth did not take.",
            registry=r,
        )
        self.swap_load_seconds = Counter(
            p + "swap_load_seconds", "Seconds of swaps spent loading the weights.", registry=r
        )
        self.swap_reset_seconds = Counter(
            p + "swap_reset_seconds",
            "Seconds of swaps spent emptying the KV cache (swap_kv=recompute).",
            registry=r,
        )
        self.swap_dropped_tokens = Counter(
            p + "swap_dropped_tokens",
            "Context tokens of running paths whose KV cache a swap dropped (swap_kv=recompute).",
            registry=r,
        )
        self.recomputed_tokens = Counter(
            p + "recomputed_tokens",
            "Context tokens of preempted paths computed again as they resumed (after a swap "
            "under swap_kv=recompute, or a full KV cache).",
            registry=r,
        )
        self.recompute_seconds = Counter(
            p + "recompute_seconds",
            "Engine-seconds those recomputed tokens cost (priced with the fitted prefill cost).",
            registry=r,
        )
        self.weight_rejected = Counter(
            p + "weight_rejected", "Weight versions refused (failed verification).", registry=r
        )
        self.prompt_wait_seconds = Histogram(
            p + "prompt_wait_seconds",
            "Seconds from prompt admission to its claim by a sampler.",
            buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.time_to_publish_seconds = Histogram(
            p + "time_to_publish_seconds",
            "Seconds from a prompt's claim to its tree's publication.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
            registry=r,
        )
        self.request_start_steps = Histogram(
            p + "request_start_steps",
            "Engine steps from submitting a request (a tree path) to its first token, as the "
            "sampler sees them (1: the next step).",
            buckets=(1, 2, 3, 4, 6, 8, 16, 32),
            registry=r,
        )
        self.deadletter = deadletter_counter(p, "Prompt entries", r)
        self.weight_announced_version = Gauge(
            p + "weight_announced_version",
            "Newest weight version announced with a valid signature (verified or not).",
            registry=r,
        )
        self.weight_failures = Counter(
            p + "weight_failures",
            "Failed attempts to fetch or verify an announced weight version, by kind.",
            ["kind"],
            registry=r,
        )
        for kind in ("announcement", "download", "verification"):
            self.weight_failures.labels(kind)
        self.weight_fetches = Counter(
            p + "weight_fetches",
            "Weight versions taken, by how: link (the learner's files on this machine), host (another "
            "sampler's copy on this machine), delta, full.",
            ["method"],
            registry=r,
        )
        for method in ("link", "host", "delta", "full"):
            self.weight_fetches.labels(method)
        self.weight_bytes_received = Counter(
            p + "weight_bytes_received",
            "Weight bytes received, by source (learner or a peer sampler).",
            ["source"],
            registry=r,
        )
        for source in ("learner", "peer"):
            self.weight_bytes_received.labels(source)
        self.weight_bytes_relayed = Gauge(
            p + "weight_bytes_relayed",
            "Weight bytes this sampler served to other samplers.",
            registry=r,
        )
        self.idle_seconds = Counter(
            p + "idle_seconds", "Seconds with no tree growing (waiting for prompts).", registry=r
        )
        self.held_off_seconds = Counter(
            p + "held_off_seconds",
            "Seconds this sampler claimed no prompt because the learner's announced weights were "
            "more than max_staleness versions ahead of its engine's (a new tree would be stale).",
            registry=r,
        )
