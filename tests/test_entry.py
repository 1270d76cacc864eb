"""How a process ends: Redis going away during a process's own stop (the normal end of a run,
when honcho stops every process at once, Redis included) is one log line and a clean exit code,
never a traceback; Redis lost for good outside a stop is one error line and exit code 1."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from pipeline.config import SamplerSettings
from pipeline.entry import ProcessSpec, process_main
from pipeline.errors import TransportError


class Ending:
    """A process whose run ends with Redis gone (after a stop request when ``stopped``)."""

    def __init__(self, stopped: bool) -> None:
        self.stopped = stopped
        self.stop = asyncio.Event()
        self.closed = False

    async def run(self, bound: int | None) -> int:
        if self.stopped:
            os.kill(os.getpid(), signal.SIGTERM)  # as honcho stops the run
            await asyncio.wait_for(self.stop.wait(), 5)
        raise TransportError(
            "redis XREADGROUP failed after 1 attempts: Connection closed by server"
        )

    def request_stop(self) -> None:
        self.stop.set()

    def close(self) -> None:
        self.closed = True

    def exit_code(self) -> int:
        return 0


def spec(process: Ending) -> ProcessSpec[SamplerSettings]:
    return ProcessSpec(
        prog="p",
        description="d",
        settings=SamplerSettings,
        section="sampler",
        build=lambda _: process,
        bound_flag="--max-prompts",
        bound_help="",
        done="done %d",
    )


@pytest.mark.parametrize("stopped", [True, False])
def test_redis_gone_at_the_end_is_one_line_not_a_traceback(
    stopped: bool, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    process = Ending(stopped)
    code = process_main(spec(process), [])
    assert "Traceback" not in capfd.readouterr().err and process.closed
    records = [r for r in caplog.records if "Connection closed by server" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None, caplog.text
    lines = [records[0].getMessage()]
    if stopped:
        assert code == 0 and "went away during the stop" in lines[0]
    else:
        assert code == 1 and "Redis unavailable" in lines[0]
