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
    from pipeline.costs import Work
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
