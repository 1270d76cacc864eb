"""Redis Streams transport (asyncio): publish, consume in groups, ack, reclaim, dead-letter.

Delivery is at-least-once: an entry is acked only after the consumer's handler returns (the work
is durable), a dead consumer's pending entries are reclaimed with XAUTOCLAIM after
``claim_idle_ms``, and a retried XADD may duplicate an entry, so consumers dedupe by message id
(``tree_id``, ``prompt_id``). Entries that fail to decode go to the run's dead-letter stream with
the reason and are acked, so one bad message never blocks a group. Trimming removes only entries
that every consumer group has acknowledged.

Every Redis call is retried with bounded exponential backoff when Redis is unreachable
(``TransportError`` after the last attempt). This module knows messages only as bytes in and
message objects out; what a process does with them lives in ``workers/`` and ``learner/``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc

from pipeline.config import RedisSettings, RunSettings, StreamSettings, stream_key
from pipeline.errors import MessageDecodeError, TransportError
from pipeline.messages import DecodeLimits, Message, decode, encode

log = logging.getLogger(__name__)

PAYLOAD_FIELD = b"m"
"""Each stream entry holds one field: the msgpack-encoded message."""

R = TypeVar("R")
_RETRYABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one run (all share the hash tag ``{<run>}``)."""

    prompts: str
    trees: str
    deadletter: str
    weights: str
    """Key holding the latest WeightAnnouncement; also the pub/sub channel announcing it."""
    heartbeat_prefix: str

    @classmethod
    def for_run(cls, run: RunSettings) -> Keys:
        return cls(
            prompts=stream_key(run, "prompts"),
            trees=stream_key(run, "trees"),
            deadletter=stream_key(run, "deadletter"),
            weights=stream_key(run, "weights"),
            heartbeat_prefix=stream_key(run, "heartbeat:"),
        )


@dataclass(frozen=True)
class Delivery:
    """One decoded stream entry handed to a consumer."""

    stream: str
    entry_id: str
    message: Message


@dataclass
class GroupInfo:
    """State of one consumer group on one stream."""

    length: int
    """Entries currently in the stream."""
    lag: int
    """Entries not yet delivered to the group."""
    pending: int
    """Entries delivered but not yet acknowledged."""
    consumers: int


@dataclass
class TransportCounters:
    """Counts this transport keeps for the process's metrics."""

    published: int = 0
    delivered: int = 0
    acked: int = 0
    reclaimed: int = 0
    deadlettered: int = 0
    retries: int = 0
    deadletter_reasons: dict[str, int] = field(default_factory=dict)


def make_client(settings: RedisSettings, read_timeout_s: float = 0.0) -> aioredis.Redis:
    """An asyncio Redis client for ``settings`` (TLS via ``rediss://``). ``read_timeout_s`` is
    added to the socket timeout so that blocking reads are not cut short."""
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_timeout": settings.connect_timeout_s + read_timeout_s,
        "decode_responses": False,
    }
    if settings.password is not None:
        kwargs["password"] = settings.password.get_secret_value()
    if settings.tls_ca_file and settings.url.startswith("rediss://"):
        kwargs["ssl_ca_certs"] = settings.tls_ca_file
    client: aioredis.Redis = aioredis.from_url(settings.url, **kwargs)
    return client


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Streams:
    """Transport over the streams of one run. Create with ``Streams(settings...)``, then
    ``await close()`` when done."""

    def __init__(
        self,
        redis: RedisSettings,
        run: RunSettings,
        streams: StreamSettings,
        limits: DecodeLimits | None = None,
    ) -> None:
        self.settings = redis
        self.stream_settings = streams
        self.keys = Keys.for_run(run)
        self.limits = limits or DecodeLimits(max_bytes=streams.max_message_bytes)
        self.client = make_client(redis, read_timeout_s=streams.block_ms / 1000)
        self.counters = TransportCounters()

    async def close(self) -> None:
        await self.client.aclose()

    # -- retries -------------------------------------------------------------------------------

    async def call(self, fn: Callable[[], Awaitable[R]], what: str) -> R:
        """Run one Redis call, retrying with bounded exponential backoff while Redis is away."""
        attempts = self.settings.retry_attempts
        for attempt in range(attempts):
            try:
                return await fn()
            except _RETRYABLE as exc:
                if attempt == attempts - 1:
                    raise TransportError(
                        f"redis {what} failed after {attempts} attempts: {exc}"
                    ) from exc
                delay = min(self.settings.retry_max_delay_s, 0.05 * 2**attempt)
                delay *= 0.5 + random.random() / 2
                self.counters.retries += 1
                log.warning(
                    "redis %s failed (%s); retry %d/%d in %.2fs",
                    what,
                    exc,
                    attempt + 1,
                    attempts - 1,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # -- groups and publishing -----------------------------------------------------------------

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the stream and the consumer group (reading from the beginning) if missing."""

        async def create() -> None:
            try:
                await self.client.xgroup_create(stream, group, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self.call(create, f"XGROUP CREATE {stream} {group}")

    async def publish(self, stream: str, msg: Message) -> str:
        """XADD one message; returns its entry id once Redis has accepted it."""
        payload = encode(msg)
        entry = await self.call(
            lambda: self.client.xadd(stream, {PAYLOAD_FIELD: payload}), f"XADD {stream}"
        )
        self.counters.published += 1
        return _s(entry)

    # -- consuming -----------------------------------------------------------------------------

    async def read(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int | None = None,
        block_ms: int | None = None,
        pending: bool = False,
        after: str = "0",
    ) -> list[Delivery]:
        """XREADGROUP up to ``count`` entries: new ones, or with ``pending`` this consumer's own
        unacknowledged ones with ids above ``after`` (a restart resumes them). Bad entries go to
        the dead-letter stream."""
        count = count or self.stream_settings.batch
        start = after if pending else ">"
        block = (
            None if pending else (self.stream_settings.block_ms if block_ms is None else block_ms)
        )
        reply: Any = await self.call(
            lambda: self.client.xreadgroup(
                group, consumer, {stream: start}, count=count, block=block
            ),
            f"XREADGROUP {stream}",
        )
        entries: list[tuple[Any, Any]] = []
        if isinstance(reply, dict):  # RESP3
            for value in reply.values():
                entries.extend(value[0] if value and isinstance(value[0], list) else value)
        else:
            for _, items in reply or []:
                entries.extend(items)
        return await self._deliveries(stream, group, entries)

    async def reclaim(
        self,
        stream: str,
        group: str,
        consumer: str,
        min_idle_ms: int | None = None,
        count: int | None = None,
    ) -> list[Delivery]:
        """Take over entries that other (dead) consumers left pending for ``min_idle_ms``."""
        idle = self.stream_settings.claim_idle_ms if min_idle_ms is None else min_idle_ms
        count = count or self.stream_settings.batch
        reply: Any = await self.call(
            lambda: self.client.xautoclaim(stream, group, consumer, idle, "0-0", count=count),
            f"XAUTOCLAIM {stream}",
        )
        entries = list(reply[1]) if reply else []
        deliveries = await self._deliveries(stream, group, entries)
        self.counters.reclaimed += len(deliveries)
        if deliveries:
            log.info(
                "reclaimed %d idle entries of %s/%s for %s",
                len(deliveries),
                stream,
                group,
                consumer,
            )
        return deliveries

    async def _deliveries(
        self, stream: str, group: str, entries: list[tuple[Any, Any]]
    ) -> list[Delivery]:
        good: list[Delivery] = []
        bad: list[str] = []
        for raw_id, fields in entries:
            entry_id = _s(raw_id)
            if not fields:  # deleted (trimmed) while pending: nothing to deliver
                bad.append(entry_id)
                continue
            payload = fields.get(PAYLOAD_FIELD)
            try:
                if payload is None:
                    raise MessageDecodeError("entry", f"no {PAYLOAD_FIELD!r} field")
                good.append(Delivery(stream, entry_id, decode(payload, self.limits)))
            except MessageDecodeError as exc:
                await self.dead_letter(stream, entry_id, payload or b"", str(exc))
                bad.append(entry_id)
        if bad:
            await self.ack(stream, group, bad)
        self.counters.delivered += len(good)
        return good

    async def dead_letter(self, stream: str, entry_id: str, payload: bytes, reason: str) -> None:
        """Park a bad entry, with its reason, on the run's dead-letter stream."""
        record: dict[Any, Any] = {
            b"source": stream.encode(),
            b"entry_id": entry_id.encode(),
            b"reason": reason.encode(),
            b"payload": payload,
            b"at": repr(time.time()).encode(),
        }
        await self.call(lambda: self.client.xadd(self.keys.deadletter, record), "XADD deadletter")
        self.counters.deadlettered += 1
        kind = reason.split(":", 1)[0]
        self.counters.deadletter_reasons[kind] = self.counters.deadletter_reasons.get(kind, 0) + 1
        log.warning("dead-lettered %s %s: %s", stream, entry_id, reason)

    async def ack(self, stream: str, group: str, entry_ids: list[str]) -> int:
        """XACK entries whose work is durable."""
        if not entry_ids:
            return 0
        n = await self.call(lambda: self.client.xack(stream, group, *entry_ids), f"XACK {stream}")
        self.counters.acked += int(n)
        return int(n)

    async def release(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
        """Hand unfinished entries back: mark them idle for ``claim_idle_ms`` so that any other
        consumer's next reclaim takes them at once (used on shutdown)."""
        if not entry_ids:
            return
        idle = self.stream_settings.claim_idle_ms
        await self.call(
            lambda: self.client.xclaim(
                stream, group, consumer, 0, list[Any](entry_ids), idle=idle, justid=True
            ),
            f"XCLAIM {stream}",
        )

    async def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        handler: Callable[[list[Delivery]], Awaitable[None]],
        *,
        max_messages: int | None = None,
        stop: asyncio.Event | None = None,
        reclaim_every_s: float | None = None,
    ) -> int:
        """Read -> handle -> ack until ``stop`` is set or ``max_messages`` were handled.

        First re-reads this consumer's own pending entries (a restart resumes them), then new
        entries, reclaiming dead consumers' entries every ``reclaim_every_s`` seconds. ``handler``
        must return only once the work is durable; entries are acked after it returns. Returns the
        number of entries handled.
        """
        await self.ensure_group(stream, group)
        every = (
            reclaim_every_s
            if reclaim_every_s is not None
            else self.stream_settings.claim_idle_ms / 2000
        )
        handled, own_pending, last_reclaim = 0, True, 0.0
        while not (stop is not None and stop.is_set()):
            if max_messages is not None and handled >= max_messages:
                break
            count = self.stream_settings.batch
            if max_messages is not None:
                count = min(count, max_messages - handled)
            if own_pending:
                batch = await self.read(stream, group, consumer, count, pending=True)
                own_pending = bool(batch)
            else:
                batch = []
                if time.monotonic() - last_reclaim >= every:
                    last_reclaim = time.monotonic()
                    batch = await self.reclaim(stream, group, consumer, count=count)
                if not batch:
                    batch = await self.read(stream, group, consumer, count)
            if batch:
                await handler(batch)
                await self.ack(stream, group, [d.entry_id for d in batch])
                handled += len(batch)
        return handled

    # -- introspection and trimming ------------------------------------------------------------

    async def group_info(self, stream: str, group: str) -> GroupInfo:
        """Length, lag and pending count of ``group`` on ``stream`` (for metrics)."""
        length = int(await self.call(lambda: self.client.xlen(stream), f"XLEN {stream}"))
        groups = await self.call(lambda: self.client.xinfo_groups(stream), f"XINFO GROUPS {stream}")
        for g in groups:
            if _s(g["name"]) == group:
                lag = g.get("lag")
                return GroupInfo(
                    length=length,
                    lag=int(lag) if lag is not None else length,
                    pending=int(g["pending"]),
                    consumers=int(g["consumers"]),
                )
        raise TransportError(f"no consumer group {group!r} on {stream}")

    async def trim_acknowledged(self, stream: str) -> int:
        """Delete entries that every consumer group has acknowledged; never an entry a group has
        yet to read or ack. Returns the number of entries removed."""
        groups = await self.call(lambda: self.client.xinfo_groups(stream), f"XINFO GROUPS {stream}")
        if not groups:
            return 0
        floor: tuple[int, int] | None = None
        for g in groups:
            if int(g["pending"]) > 0:

                async def pending_summary(name: Any = g["name"]) -> Any:
                    return await self.client.xpending(stream, name)

                summary = await self.call(pending_summary, f"XPENDING {stream}")
                bound = _id_key(_s(summary["min"]))
            else:
                bound = _id_key(_s(g["last-delivered-id"]))
            floor = bound if floor is None else min(floor, bound)
        assert floor is not None
        minid = f"{floor[0]}-{floor[1]}"
        removed = await self.call(
            lambda: self.client.xtrim(stream, minid=minid, approximate=False), f"XTRIM {stream}"
        )
        return int(removed)
