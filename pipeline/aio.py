"""Small asyncio helpers shared by the processes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from pipeline.errors import Stopping

T = TypeVar("T")


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``stop`` is set, whichever comes first; True if stopped."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
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
