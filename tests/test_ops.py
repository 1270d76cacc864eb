"""Ops files: the Grafana dashboard only uses declared metrics; Prometheus config is valid."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from learner.metrics import LearnerMetrics
from tests.helpers import dashboard_exprs
from workers.metrics import SamplerMetrics

ROOT = Path(__file__).resolve().parent.parent


def declared_names() -> set[str]:
    names = set()
    for metrics in (SamplerMetrics(), LearnerMetrics()):
        for family in metrics.registry.collect():
            names.update(sample.name for sample in family.samples)
            names.add(family.name)
    return names


def test_dashboard_uses_only_declared_metrics() -> None:
    declared = declared_names()
    used = {m for _, expr, _ in dashboard_exprs() for m in re.findall(r"treepo_[a-z_]+", expr)}
    assert used, "the dashboard queries treepo metrics"
    assert not used - declared, f"undeclared: {sorted(used - declared)}"


def test_every_dashboard_query_filters_by_run() -> None:
    """The ``run`` variable selects one run's series (every process labels its metrics with the
    run name) in every metric selector of every panel."""
    import json

    board = json.loads((ROOT / "ops" / "grafana" / "dashboards" / "treepo.json").read_text())
    assert [v["name"] for v in board["templating"]["list"]] == ["run"]
    for _, expr, _ in dashboard_exprs(run="$run"):
        for selector in re.findall(r"treepo_[a-z_]+(\{[^}]*\})?", expr):
            assert 'run=~"$run"' in selector, expr


def test_metrics_served_over_http_carry_the_run_label() -> None:
    from prometheus_client import generate_latest

    from pipeline.httpserver import Labelled

    text = generate_latest(Labelled(SamplerMetrics().registry, {"run": "r1"})).decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all('run="r1"' in line for line in samples)


def test_metric_names_follow_the_convention() -> None:
    for metrics, process in ((SamplerMetrics(), "sampler"), (LearnerMetrics(), "learner")):
        for family in metrics.registry.collect():
            assert family.name.startswith(f"treepo_{process}_"), family.name
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with `make setup`")
def test_promtool_accepts_config_and_metrics(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    out = subprocess.run(
        ["promtool", "check", "config", str(ROOT / "ops" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for metrics in (SamplerMetrics(), LearnerMetrics()):
        text = generate_latest(metrics.registry)
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_every_dashboard_panel_has_a_unit() -> None:
    """Readers see seconds, fractions and rates as such (Grafana unit ids or ``suffix:``)."""
    import json

    panels = json.loads((ROOT / "ops" / "grafana" / "dashboards" / "treepo.json").read_text())[
        "panels"
    ]
    missing = [
        p["title"] for p in panels if not p.get("fieldConfig", {}).get("defaults", {}).get("unit")
    ]
    assert not missing, missing
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels}
    assert units["Token savings vs independent sampling"] == "percentunit"
    assert units["Weight swap seconds (p50)"] == "s"
