"""Shared fixtures: a real redis-server per test on a free loopback port."""

from __future__ import annotations

import asyncio
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
        RedisSettings(url=server.url, connect_timeout_s=2.0, retry_attempts=40, retry_max_delay_s=0.5),
        RunSettings(name=run),
        StreamSettings(**stream_kw),  # type: ignore[arg-type]
    )


def run(coro: object) -> object:
    """Run a coroutine to completion in a fresh event loop (plain test functions, no plugin)."""
    return asyncio.run(coro)  # type: ignore[arg-type]
