"""Small helpers shared by the processes: asyncio waits and retry jitter."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from pipeline.errors import Stopping, TransportError

T = TypeVar("T")
log = logging.getLogger(__name__)

jitter = random.Random()
"""Randomness for retry jitter and the order of sources, apart from the global ``random``: an
engine in the same process seeds that with the run's seed, the same in every sampler, which
would make them all back off and pick sources in step."""


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``stop`` is set, whichever comes first; True if stopped."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def unless_stopped(stop: asyncio.Event, work: Awaitable[T], what: str) -> T:
    """Await ``work``; if ``stop`` is set first, cancel it and raise ``Stopping`` (a blocking call
    in a worker thread is abandoned, not interrupted: the process is about to exit)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        raise Stopping(f"stopped during {what}")
    return task.result()


class Background:
    """Tasks that run beside a process's main loop. One that dies of an error (not of a stop)
    calls ``on_failure`` with it, once; ``close`` cancels them all and waits for them."""

    def __init__(
        self,
        on_failure: Callable[[BaseException], None],
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.on_failure = on_failure
        self.stopping = stopping
        """True once the process is stopping: a task that then loses Redis is not a failure."""
        self.tasks: list[asyncio.Task[Any]] = []

    def start(self, name: str, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._check)
        self.tasks.append(task)

    def _check(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or isinstance(task.exception(), Stopping):
            return
        error = task.exception()
        if isinstance(error, TransportError) and self.stopping():
            log.info(
                "background task %s: Redis went away during the stop (%s)", task.get_name(), error
            )
            return
        if error is not None:
            log.error("background task %s died: %r; stopping", task.get_name(), error)
            self.on_failure(error)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
