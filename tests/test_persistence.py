"""The learner's durable side with Redis away: checkpoint, acknowledgement and announcement
while the process is stopping (no crash, nothing lost) and while it is not (the error is
raised, so the run does not go on silently). No DeepSpeed: a small torch module stands in."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from learner.metrics import LearnerMetrics
from learner.persistence import Persistence
from learner.state import LearnerState
from learner.trainer import Engine
from pipeline.config import (
    LearnerOptions,
    LearnerSettings,
    RedisSettings,
    RunSettings,
    WeightSettings,
)
from pipeline.errors import TransportError
from pipeline.wire.streams import Streams
from tests.services import free_port


def setup(tmp_path: Path) -> tuple[Persistence, asyncio.Event, torch.nn.Module]:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there: Redis is down
    settings = LearnerSettings(
        redis=RedisSettings(url=url, retry_attempts=2, connect_timeout_s=0.5),
        run=RunSettings(name="persist"),
        learner=LearnerOptions(work_dir=str(tmp_path)),
        weights=WeightSettings(),
    )
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # some optimizer state to save and restore
    engine = Engine(SimpleNamespace(module=module), optimizer, 0, 0.1, 0)
    stop = asyncio.Event()
    streams = Streams.for_process(settings, 100, stop, lambda reason: None)
    durable = Persistence(settings, engine, streams, LearnerMetrics(), stop)
    durable.store.publish(3, lambda d: save_file(module.state_dict(), str(d / "m.safetensors")))
    return durable, stop, module


def test_announcement_while_stopping_with_redis_down_is_skipped_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    durable, stop, _ = setup(tmp_path)

    async def main() -> None:
        with pytest.raises(TransportError):  # not stopping: the failure must surface
            await durable.publish(3, "http://127.0.0.1:1")
        stop.set()
        with caplog.at_level(logging.WARNING):
            await durable.publish(3, "http://127.0.0.1:1")  # returns: the version stays stored
        await durable.streams.close()

    asyncio.run(main())
    assert "weights v3 not announced" in caplog.text
    assert durable.metrics.publish_bytes._value.get() == 0  # nothing was announced
    assert durable.store.versions() == [3]


def test_checkpoint_while_stopping_keeps_unacknowledged_entries_and_resumes(
    tmp_path: Path,
) -> None:
    durable, stop, module = setup(tmp_path)
    state = LearnerState(step=4, cursor=9, trained={"t-q1", "t-q2"})
    rng = random.Random(5)
    rng.random()
    expected_next = random.Random()
    expected_next.setstate(rng.getstate())

    async def main() -> list[str]:
        with pytest.raises(TransportError):
            await durable.checkpoint(state, rng, ["1-0"])
        stop.set()
        left = await durable.checkpoint(state, rng, ["1-0", "2-0"])
        await durable.streams.close()
        return left

    assert asyncio.run(main()) == ["1-0", "2-0"]  # acknowledged by the next run instead
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.weight.zero_()
    fresh = random.Random(0)
    resumed = durable.resume(fresh)
    assert resumed is not None
    assert (resumed.step, resumed.cursor, resumed.trained) == (4, 9, {"t-q1", "t-q2"})
    assert fresh.random() == expected_next.random()
    assert torch.equal(module.weight, weights["weight"])
