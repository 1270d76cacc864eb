"""A worker's heartbeat: a key with a TTL that says it is alive and which policy it runs.

The learner re-admits a prompt held by a consumer only when that consumer's heartbeat is gone
(``Streams.alive``), so a sampler refreshes its key every third of the TTL while it runs and
marks it ``stopped`` on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

from pipeline.aio import wait_or_stop
from pipeline.errors import Stopping, TransportError
from pipeline.wire.messages import Heartbeat
from pipeline.wire.streams import Streams

log = logging.getLogger("workers.sampler")


class HeartbeatSender:
    def __init__(
        self,
        streams: Streams,
        worker_id: str,
        role: str,
        version: Callable[[], int],
        stop: asyncio.Event,
        ttl_s: float,
    ) -> None:
        self.streams = streams
        self.worker_id = worker_id
        self.role = role
        self.version = version
        self.stop = stop
        self.ttl_s = ttl_s

    async def send(self, state: str) -> None:
        """Set the heartbeat key (after a stop: one short attempt, Redis may be gone)."""
        hb = Heartbeat(
            self.worker_id,
            self.role,
            socket.gethostname(),
            os.getpid(),
            self.version(),
            time.time(),
            state,
        )
        try:
            await self.streams.heartbeat(hb, self.ttl_s)
        except (TransportError, Stopping) as exc:
            if not self.stop.is_set():
                raise
            log.info("final heartbeat not sent: %s", exc)

    async def loop(self) -> None:
        """``running`` every third of the TTL until the stop event."""
        while not self.stop.is_set():
            await self.send("running")
            await wait_or_stop(self.stop, self.ttl_s / 3)
