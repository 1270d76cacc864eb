"""The demo's report of how weight versions reached the samplers, from the samplers' own
summaries (written by the sampler's accounting)."""

from __future__ import annotations

import json
from pathlib import Path

from toy.demo import weight_fetches, weight_line
from workers.accounting import Accounting
from workers.metrics import SamplerMetrics


def sampler_summary(path: Path, link: int, full: int, host: int = 0) -> None:
    metrics = SamplerMetrics()
    metrics.weight_fetches.labels("link").inc(link)
    metrics.weight_fetches.labels("full").inc(full)
    metrics.weight_fetches.labels("host").inc(host)
    Accounting(metrics, path).write_summary(version=link + full + host)


def test_the_demo_counts_how_samplers_took_each_version(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sampler_summary(run / "samplers" / "a" / "summary.json", link=5, full=1)
    sampler_summary(run / "samplers" / "b" / "summary.json", link=2, full=0, host=3)
    saved = json.loads((run / "samplers" / "a" / "summary.json").read_text())
    assert saved["weight_fetches"] == {"link": 5.0, "host": 0.0, "delta": 0.0, "full": 1.0}
    assert saved["policy_version"] == 6

    taken = weight_fetches(run)
    assert taken == {"link": 7.0, "host": 3.0, "delta": 0.0, "full": 1.0}
    line = weight_line(
        {
            "weight_versions_published": 8,
            "weight_bytes_per_version": 3_180_000,
            "weight_delta_computed_fraction_median": 0.67,
            "weight_deltas_offered": 0,
            "weight_fetches": taken,
        }
    )
    assert "8 versions of 3.18 MB" in line
    assert "67% of that (median), above the 50% at which it is offered" in line
    assert line.endswith("samplers took them by link 7, host 3, full 1")  # no 'delta 0'


def test_a_run_without_deltas_or_sampler_summaries_still_reports_its_versions(
    tmp_path: Path,
) -> None:
    summary = {
        "weight_versions_published": 3,
        "weight_bytes_per_version": 1_000_000,
        "weight_delta_computed_fraction_median": None,
        "weight_deltas_offered": 0,
        "weight_fetches": weight_fetches(tmp_path),
    }
    assert weight_line(summary) == "[demo] weight updates: 3 versions of 1.00 MB"


def test_the_demo_reports_engine_steps_and_request_start_lag(tmp_path: Path) -> None:
    """Steps run and priced add up over samplers; the start lag is the mean over all requests
    (weighted by each sampler's request count, not a mean of the samplers' means)."""
    from pipeline.treepo.costs import Work
    from toy.demo import engine_steps

    run = tmp_path / "run"
    for name, steps, priced, lags in (("a", 100, 80.0, [2, 2, 3]), ("b", 50, 45.5, [1])):
        metrics = SamplerMetrics()
        metrics.engine_steps.inc(steps)
        acc = Accounting(metrics, run / "samplers" / name / "summary.json")
        acc.independent = Work(10.0, 20.0, priced)
        for lag in lags:
            acc.on_request_started(lag)
        acc.write_summary(version=0)
    got = engine_steps(run)
    assert got["engine_steps"] == 150 and got["independent_engine_steps"] == 125.5
    assert got["mean_request_start_steps"] == (2 + 2 + 3 + 1) / 4
    assert engine_steps(tmp_path / "none")["mean_request_start_steps"] is None


def test_a_weight_swap_is_kept_out_of_the_steps_and_counted_on_both_sides(
    tmp_path: Path,
) -> None:
    """A swap between two steps is not in the next step's seconds (nor in the cost model's
    fit); the sampler's engine-seconds used and the independent price both include it, so it
    moves no saving; the demo adds the samplers' swap seconds up."""
    import time

    from toy.demo import savings
    from workers.engine import EngineMeter, SwapStats

    meter = EngineMeter()
    steps: list[float] = []
    meter.listeners.append(lambda s: steps.append(s.seconds))
    metrics = SamplerMetrics()
    acc = Accounting(metrics, tmp_path / "run" / "samplers" / "a" / "summary.json")
    meter.listeners.append(acc.on_step)
    meter.swap_listeners.append(acc.on_swap)
    meter.started()
    meter.step(4, 0, 1)
    time.sleep(0.05)  # the swap itself
    meter.swapped(SwapStats(0.03, 0.02, 120))  # a recompute swap: 120 context tokens dropped
    meter.step(0, 0, 1, recomputed=120)  # ... and computed again as the paths resume
    started = time.perf_counter()
    time.sleep(0.02)
    meter.step(0, 0, 1)
    reference = time.perf_counter() - started
    meter.ended()
    meter.swapped(SwapStats(0.5, 0.0, 0))  # a keep swap while idle: in no step, both sides
    assert steps[1] < 0.04, steps  # the 50 ms swap is not in the step after it
    assert 0.015 < steps[2] <= reference + 0.005
    assert meter.swap_seconds == 0.55 and meter.snapshot()["swap_seconds"] == 0.55
    assert abs(acc.used_seconds - (sum(steps) + 0.55)) < 1e-9
    assert acc.independent_seconds == 0.55  # no tree priced yet: only the swaps
    acc.write_summary(version=1)
    summary = json.loads((tmp_path / "run" / "samplers" / "a" / "summary.json").read_text())
    assert summary["weight_swap_seconds"] == 0.55
    assert summary["treepo_sampler_gpu_seconds_used_total"] == acc.used_seconds
    assert summary["treepo_sampler_gpu_seconds_independent_total"] == 0.55
    assert savings(tmp_path / "run")["weight_swap_seconds"] == 0.55
    # the swap's parts and the context it made the engine compute again
    assert summary["treepo_sampler_swap_load_seconds_total"] == 0.53
    assert summary["treepo_sampler_swap_reset_seconds_total"] == 0.02
    assert summary["treepo_sampler_swap_dropped_tokens_total"] == 120
    assert summary["treepo_sampler_recomputed_tokens_total"] == 120
    # priced at the fitted cost of a prefill token
    coef = acc.cost.coef[0]
    assert summary["treepo_sampler_recompute_seconds_total"] >= 0
    assert savings(tmp_path / "run")["recomputed_tokens"] == 120 and coef >= 0
