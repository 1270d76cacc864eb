"""Samplers on one machine fetch each weight version once.

A node with eight GPUs runs eight samplers; without sharing, each of them downloads every version
and the machine's link carries it eight times. With sharing, the first sampler of the machine to
see a version takes a lease on it in Redis (``claim_weight_fetch``: one key per machine and
version, lapsing after ``lease_s`` unless its holder renews it) and fetches it the usual way
(relay peers, learner, delta); when its copy has verified it advertises the directory beside its
relay URL (``advertise_weights``). The other samplers of the machine wait for that advertisement
and hard-link the verified files (``pipeline.weights.transfer``: the copy's manifest must be the
announced one byte for byte; sizes and safetensors headers are checked as for any version).

Nothing waits forever: when the holder fails it gives the lease back, when it dies the lease
lapses, and the next sampler takes it and fetches; a waiter whose time runs out fetches on its
own, and so does a sampler that cannot reach Redis for it (sharing only saves transfers: it is
never a reason not to fetch). A copy that disappears before it is linked (its sampler pruned it)
means a download.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pipeline.errors import Stopping
from pipeline.weights.manifest import machine_id
from pipeline.wire.streams import Streams

log = logging.getLogger(__name__)


class HostShare:
    """One sampler's side of sharing versions with the other samplers of its machine."""

    def __init__(
        self,
        streams: Streams,
        worker_id: str,
        *,
        machine: str | None = None,
        lease_s: float = 5.0,
        poll_s: float = 0.05,
    ) -> None:
        self.streams = streams
        self.worker_id = worker_id
        self.machine = machine or machine_id()
        self.lease_s = lease_s
        self.poll_s = poll_s

    async def copies(self, version: int) -> list[Path]:
        """Verified copies of ``version`` other samplers of this machine advertise."""
        found = await self.streams.weight_copies(version, self.machine)
        return [Path(d) for d in found]

    async def wait_or_claim(self, version: int, timeout_s: float) -> list[Path]:
        """Copies of ``version`` to link, waiting while another sampler of this machine fetches
        it; ``[]`` when this sampler is to fetch it (it then holds the lease: ``fetching``), or
        when ``timeout_s`` ran out."""
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                copies = await self.copies(version)
                if copies:
                    if waited:
                        log.info("v%d: linking the copy of a sampler on this machine", version)
                    return copies
                if await self.streams.claim_weight_fetch(
                    self.machine, version, self.worker_id, self.lease_s
                ):
                    return []
            except Stopping:
                raise
            except Exception as exc:  # sharing is an optimisation: Redis away or an ACL denial
                log.warning(
                    "v%d: cannot share with this machine's samplers (%s); fetching", version, exc
                )
                return []
            if time.monotonic() >= deadline:
                log.warning(
                    "v%d: waited %.0fs for this machine's copy; fetching", version, timeout_s
                )
                return []
            waited = True
            await asyncio.sleep(self.poll_s)

    @contextlib.asynccontextmanager
    async def fetching(self, version: int) -> AsyncIterator[None]:
        """Hold this machine's lease on ``version`` while the block fetches it (renewed every
        third of ``lease_s``), and give it back after, whatever happened."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.lease_s / 3)
                with contextlib.suppress(Exception):  # a lapsed lease only costs a duplicate fetch
                    await self.streams.renew_weight_fetch(
                        self.machine, version, self.worker_id, self.lease_s
                    )

        task = asyncio.ensure_future(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(Exception):
                await self.streams.release_weight_fetch(self.machine, version, self.worker_id)


@contextlib.asynccontextmanager
async def shared_fetch(
    share: HostShare | None, version: int, timeout_s: float
) -> AsyncIterator[list[Path]]:
    """What a sampler does around fetching ``version``: yields the copies of it on this machine
    to link (after waiting while another sampler fetches it), or ``[]`` when this sampler is to
    fetch it, holding the machine's lease until the block ends (advertise the copy inside the
    block, so that the waiters find it before the lease is given back). ``share`` None: ``[]``,
    no lease."""
    if share is None:
        yield []
        return
    copies = await share.wait_or_claim(version, timeout_s)
    if copies:
        yield copies
        return
    async with share.fetching(version):
        yield []
