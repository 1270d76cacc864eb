"""Shared fixtures: a real redis-server per test on a free loopback port, the toy model and one
vLLM engine per session. Helpers that tests share are in tests/helpers.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TOY_TEST_SPEC
from tests.services import RedisServer, free_port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", free_port()).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def toy_model() -> Path:
    """The toy model kit's model, built once and cached under .cache/ (a second run is instant)."""
    from toy.kit import ToySpec, build_toy_model

    root = Path(__file__).resolve().parent.parent / ".cache"
    return build_toy_model(root / "toy-test", seed=0, spec=ToySpec(**TOY_TEST_SPEC))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def engine(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One vLLM CPU engine on a copy of the toy model, shared by the session (slow start)."""
    from workers.engine import EngineOptions, VLLMPathGenerator

    model = tmp_path_factory.mktemp("engine") / "model"
    shutil.copytree(toy_model, model)
    gen = VLLMPathGenerator(EngineOptions(model=str(model), dtype="float32"))
    yield gen
    gen.close()


@pytest.fixture
def tokenizer(engine):  # type: ignore[no-untyped-def]
    return engine.tokenizer
