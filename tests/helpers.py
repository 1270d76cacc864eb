"""Helpers that several test modules share (fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import RedisSettings, RunSettings, StreamSettings
from pipeline.wire.streams import Streams
from tests.services import RedisServer

T = TypeVar("T")


def make_streams(server: RedisServer, run: str = "test", **stream_kw: object) -> Streams:
    """A transport on ``server`` with short timeouts suited to tests."""
    stream_kw.setdefault("block_ms", 100)
    return Streams(
        RedisSettings(
            url=server.url, connect_timeout_s=2.0, retry_attempts=40, retry_max_delay_s=0.5
        ),
        RunSettings(name=run),
        StreamSettings(**stream_kw),  # type: ignore[arg-type]
    )


TOY_TEST_SPEC = {
    "worked_steps": 300,
    "worked_target": 0.0,
    "eval_every": 300,
    "eval_problems": 50,
    "mix_steps": 0,
}
"""A quick warm-up for tests: the model learns the worked-answer format, not yet the arithmetic."""


def restore_base_weights(engine, tmp: Path, version: int) -> None:  # type: ignore[no-untyped-def]
    """Give the session engine its original weights (and version) back after a test swapped."""
    d = tmp / "restore-base"
    d.mkdir(exist_ok=True)
    shutil.copy(Path(engine.options.model) / "model.safetensors", d / "model.safetensors")
    engine.stage_weights(version, d)
    engine.swap_now()


def run_restoring(engine, tmp: Path, version: int, main: Coroutine[Any, Any, T]) -> T:  # type: ignore[no-untyped-def]
    """``asyncio.run(main)`` for a test that swaps weights into the session engine, then give
    the engine its original weights back, also when the test fails."""
    try:
        return asyncio.run(main)
    finally:
        restore_base_weights(engine, tmp, version)


DASHBOARD = (
    Path(__file__).resolve().parent.parent / "ops" / "grafana" / "dashboards" / "treepo.json"
)


def dashboard_exprs(run: str = ".*") -> list[tuple[str, str, bool]]:
    """(panel title, PromQL expression, is a core panel) of every target of the dashboard, with
    its ``$run`` variable set to ``run`` (a regular expression, as Grafana substitutes it)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (p["title"], t["expr"].replace("$run", run), p.get("description") == "core panel")
        for p in panels
        for t in p["targets"]
    ]
