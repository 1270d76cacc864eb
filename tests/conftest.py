"""Shared fixtures: a real redis-server per test on a free loopback port."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import RedisSettings, RunSettings, StreamSettings
from pipeline.streams import Streams
from tests.services import RedisServer, free_port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", free_port()).start()
    try:
        yield server
    finally:
        server.kill()


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


def run(coro: object) -> object:
    """Run a coroutine to completion in a fresh event loop (plain test functions, no plugin)."""
    return asyncio.run(coro)  # type: ignore[arg-type]


TOY_TEST_SPEC = {
    "max_steps": 300,
    "eval_every": 300,
    "target_accuracy": 1.1,
    "eval_problems": 50,
    "mix_steps": 0,
}
"""A quick warm-up for tests: the model learns the worked-answer format, not yet the arithmetic."""


@pytest.fixture(scope="session")
def toy_model() -> Path:
    """The toy model kit's model, built once and cached under .cache/ (a second run is instant)."""
    from learner.toy import ToySpec, build_toy_model

    root = Path(__file__).resolve().parent.parent / ".cache"
    return build_toy_model(root / "toy-test", seed=0, spec=ToySpec(**TOY_TEST_SPEC))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def engine(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One vLLM CPU engine on a copy of the toy model, shared by the session (slow start)."""
    from workers.engine import EngineOptions, VLLMSegmentGenerator

    model = tmp_path_factory.mktemp("engine") / "model"
    shutil.copytree(toy_model, model)
    gen = VLLMSegmentGenerator(EngineOptions(model=str(model), dtype="float32"))
    yield gen
    gen.close()


@pytest.fixture
def tokenizer(engine):  # type: ignore[no-untyped-def]
    return engine.llm.get_tokenizer()


def restore_base_weights(engine, tmp: Path, version: int) -> None:  # type: ignore[no-untyped-def]
    """Give the session engine its original weights (and version) back after a test swapped."""
    d = tmp / "restore-base"
    d.mkdir(exist_ok=True)
    shutil.copy(Path(engine.options.model) / "model.safetensors", d / "model.safetensors")
    engine.stage_weights(version, d)
    engine.swap_now()
