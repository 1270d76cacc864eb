"""``treepo status``: a terminal view of a running pipeline from Redis and the /metrics endpoints.

It reads the run's heartbeats, streams and weight announcement from Redis, and scrapes each given
metrics URL twice, ``interval`` seconds apart, to turn counters into rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pipeline.errors import MessageDecodeError
from pipeline.wire.messages import Heartbeat, WeightAnnouncement, decode_as
from pipeline.wire.streams import Streams


@dataclass
class Snapshot:
    samplers: list[Heartbeat] = field(default_factory=list)
    weights_version: int | None = None
    streams: dict[str, dict[str, int]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)


async def scrape(urls: list[str]) -> dict[str, float]:
    """Sum of every sample (by metric name) over the reachable endpoints."""
    totals: dict[str, float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        for url in urls:
            try:
                async with http.get(url) as resp:
                    text = await resp.text()
            except (TimeoutError, aiohttp.ClientError, OSError):
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


async def snapshot(streams: Streams, urls: list[str], interval: float) -> Snapshot:
    snap = Snapshot()
    keys = streams.keys
    snap.samplers = [hb for hb in await streams.heartbeats() if hb.role == "sampler"]
    raw = await streams.latest_weights()
    if raw:
        with contextlib.suppress(MessageDecodeError):
            snap.weights_version = decode_as(raw, WeightAnnouncement).version
    for name, stream, group in (
        ("prompts", keys.prompts, "samplers"),
        ("trees", keys.trees, "learner"),
    ):
        try:
            info = await streams.group_info(stream, group)
            snap.streams[name] = {"length": info.length, "lag": info.lag, "pending": info.pending}
        except Exception:  # stream or group not created yet
            snap.streams[name] = {}
    first = await scrape(urls)
    started = time.monotonic()
    await asyncio.sleep(interval)
    second = await scrape(urls)
    elapsed = time.monotonic() - started
    snap.metrics = second
    for name in (
        "treepo_sampler_trees_total",
        "treepo_sampler_tokens_decoded_total",
        "treepo_learner_steps_total",
        "treepo_learner_tokens_trained_total",
    ):
        if name in first and name in second:
            snap.rates[name] = (second[name] - first[name]) / elapsed
    return snap


def render(snap: Snapshot) -> str:
    m, r = snap.metrics, snap.rates
    lines = [
        f"weights announced: v{snap.weights_version}"
        if snap.weights_version is not None
        else "weights announced: none"
    ]
    lines.append(
        f"learner policy version: {m.get('treepo_learner_policy_version', float('nan')):.0f}"
    )
    alive = [h for h in snap.samplers if h.role == "sampler" and h.state == "running"]
    lines.append(f"samplers alive: {len(alive)}")
    for h in sorted(snap.samplers, key=lambda h: h.worker_id):
        lines.append(
            f"  {h.worker_id:<24} v{h.policy_version:<5} {h.state:<8} {h.host} pid {h.pid}"
        )
    for name, info in snap.streams.items():
        lines.append(
            f"stream {name}: " + (", ".join(f"{k} {v}" for k, v in info.items()) or "absent")
        )
    decoded = m.get("treepo_sampler_tokens_decoded_total", 0.0)
    independent = m.get("treepo_sampler_tokens_independent_total", 0.0)
    saving = 1 - decoded / independent if independent else 0.0
    lines += [
        f"trees/s {r.get('treepo_sampler_trees_total', 0.0):.2f}   decoded tokens/s "
        f"{r.get('treepo_sampler_tokens_decoded_total', 0.0):.0f}   learner steps/s "
        f"{r.get('treepo_learner_steps_total', 0.0):.2f}   trained tokens/s "
        f"{r.get('treepo_learner_tokens_trained_total', 0.0):.0f}",
        f"reward (learner batch) {m.get('treepo_learner_reward_mean', float('nan')):+.3f}   "
        f"trees dropped: no signal "
        f"{m.get('treepo_learner_trees_dropped_no_signal_total', 0.0):.0f}, stale "
        f"{m.get('treepo_learner_trees_dropped_stale_total', 0.0):.0f}",
        f"savings: {saving:.1%} of decoded tokens, "
        f"{m.get('treepo_sampler_gpu_seconds_saved', 0.0):.1f} GPU-seconds",
    ]
    return "\n".join(lines)


def default_urls() -> list[str]:
    """The Procfile's honcho ports: learner 5100, samplers 5200-5207."""
    return ["http://127.0.0.1:5100/metrics"] + [
        f"http://127.0.0.1:{p}/metrics" for p in range(5200, 5208)
    ]


async def run_status(streams: Streams, urls: list[str], interval: float, watch: bool) -> str:
    while True:
        text = render(await snapshot(streams, urls, interval))
        if not watch:
            return text
        print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + "treepo status\n" + text, flush=True)
