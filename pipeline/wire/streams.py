"""Redis Streams transport (asyncio): publish, consume in groups, ack, reclaim, dead-letter.

Delivery is at-least-once: an entry is acked only after the consumer's handler returns (the work
is durable), a dead consumer's pending entries are reclaimed with XAUTOCLAIM after
``claim_idle_ms``, and a retried XADD may duplicate an entry, so consumers dedupe by message id
(``tree_id``, ``prompt_id``). Entries that fail to decode go to the run's dead-letter stream with
the reason and are acked, so one bad message never blocks a group. Trimming removes only entries
that every consumer group has acknowledged.

Every Redis call is retried with bounded exponential backoff when Redis is unreachable
(``TransportError`` after the last attempt). A process hands its stop event to ``Streams``: once it
is set, a call in flight or in backoff ends at once with ``Stopping``, and later calls (the
shutdown's release, ack and checkpoint bookkeeping) get one short attempt each, so a process stops
within seconds even while Redis is down. Every reply is read defensively: an empty pending
summary, an XAUTOCLAIM of deleted entries, a stream or group that a Redis restart lost.

This module knows messages only as bytes in and message objects out; what a process does with
them lives in ``workers/`` and ``learner/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis import exceptions as rexc

from pipeline.aio import jitter, unless_stopped, wait_or_stop
from pipeline.config import (
    ProcessSettings,
    RedisSettings,
    RunSettings,
    StreamSettings,
    stream_key,
)
from pipeline.errors import MessageDecodeError, Stopping, TransportError
from pipeline.wire.messages import (
    DecodeLimits,
    Heartbeat,
    Message,
    PromptTask,
    TreeRollout,
    decode,
    decode_as,
    encode,
)

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
    weight_sources: str
    """Hash: worker id -> the version it holds, where it serves it (a relay) and, for samplers
    of its machine, its directory (``advertise_weights``)."""
    weight_fetch_prefix: str
    """Leases: which sampler of a machine fetches a version (``claim_weight_fetch``)."""
    heartbeat_prefix: str

    @classmethod
    def for_run(cls, run: RunSettings) -> Keys:
        return cls(
            prompts=stream_key(run, "prompts"),
            trees=stream_key(run, "trees"),
            deadletter=stream_key(run, "deadletter"),
            weights=stream_key(run, "weights"),
            weight_sources=stream_key(run, "weight-sources"),
            weight_fetch_prefix=stream_key(run, "weight-fetch:"),
            heartbeat_prefix=stream_key(run, "heartbeat:"),
        )


@dataclass(frozen=True)
class Delivery:
    """One decoded stream entry handed to a consumer."""

    stream: str
    entry_id: str
    message: Message
    payload: bytes = b""
    """The entry's bytes as read (kept for the dead-letter record if the consumer rejects it)."""


PROMPT_GROUP = "samplers"
"""Consumer group of the samplers on the prompts stream."""
TREE_GROUP = "learner"
"""Consumer group of the learner on the trees stream."""

DEADLETTER_REASONS = (
    "decode",
    "wrong_type",
    "too_long",
    "bad_token",
    "unknown_task",
    "unknown_prompt",
    "engine_error",
    "sampling",
    "deleted",
)
"""Why an entry was dead-lettered (the ``reason`` label of the processes' dead-letter counters):
undecodable bytes; a valid message of another stream's type; a prompt longer than the engine's
context; a token id outside the model's vocabulary; a reward function nobody knows; a tree for a
prompt the learner never admitted (or already resolved); an engine error on this one prompt; a
tree sampled with settings the learner cannot train on (top_p < 1); an entry trimmed while
pending."""


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
    """Dead-lettered entries by reason kind (the text before the first ``:`` of the reason)."""


def make_client(settings: RedisSettings, read_timeout_s: float = 0.0) -> aioredis.Redis:
    """An asyncio Redis client for ``settings`` (TLS via ``rediss://``). ``read_timeout_s`` is
    added to the socket timeout so that blocking reads are not cut short."""
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_timeout": settings.connect_timeout_s + read_timeout_s,
        "decode_responses": False,
    }
    if settings.username:  # empty = none (the Procfile maps an unset password to "")
        kwargs["username"] = settings.username
    if settings.password is not None and settings.password.get_secret_value():
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
        self.expect: dict[str, type] = {
            self.keys.prompts: PromptTask,
            self.keys.trees: TreeRollout,
        }
        """The one message type each stream carries; anything else is dead-lettered."""
        self.on_deadletter: Callable[[str], None] | None = None
        """Called with the reason of every dead-lettered entry (the process counts them)."""
        self.stop: asyncio.Event | None = None
        """The owning process's stop event (see ``call``); None: calls are never interrupted."""
        self.stopping_timeout_s = 1.0
        """Time limit of each call made after ``stop`` was set (one attempt, no retry)."""

    @classmethod
    def for_process(
        cls,
        settings: ProcessSettings,
        vocab_size: int,
        stop: asyncio.Event,
        on_deadletter: Callable[[str], None],
    ) -> Streams:
        """The streams of a sampler or learner process: token ids checked against the model's
        ``vocab_size``, calls interrupted by ``stop``, each dead-lettered reason reported."""
        limits = DecodeLimits(max_bytes=settings.streams.max_message_bytes, vocab_size=vocab_size)
        streams = cls(settings.redis, settings.run, settings.streams, limits)
        streams.stop = stop
        streams.on_deadletter = on_deadletter
        return streams

    async def close(self) -> None:
        await self.client.aclose()

    # -- retries -------------------------------------------------------------------------------

    async def call(self, fn: Callable[[], Awaitable[R]], what: str) -> R:
        """Run one Redis call, retrying with bounded exponential backoff while Redis is away.

        With a stop event: a call in flight or in backoff when it is set raises ``Stopping``;
        a call started after it is set gets one attempt of ``stopping_timeout_s``."""
        attempts = self.settings.retry_attempts
        for attempt in range(attempts):
            stopping = self.stop is not None and self.stop.is_set()
            try:
                if stopping:
                    return await asyncio.wait_for(fn(), self.stopping_timeout_s)
                if self.stop is None:
                    return await fn()
                return await unless_stopped(self.stop, fn(), f"redis {what}")
            except _RETRYABLE as exc:
                if stopping or attempt == attempts - 1:
                    raise TransportError(
                        f"redis {what} failed after {attempt + 1} attempts: {exc}"
                    ) from exc
                delay = min(self.settings.retry_max_delay_s, 0.05 * 2**attempt)
                delay *= 0.5 + jitter.random() / 2
                self.counters.retries += 1
                log.warning(
                    "redis %s failed (%s); retry %d/%d in %.2fs",
                    what,
                    exc,
                    attempt + 1,
                    attempts - 1,
                    delay,
                )
                if self.stop is None:
                    await asyncio.sleep(delay)
                elif await wait_or_stop(self.stop, delay):
                    raise Stopping(f"stopped while retrying redis {what}") from exc
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
        reply: Any = await self._group_call(
            stream,
            group,
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
        """Take over entries left pending for ``min_idle_ms``: a dead consumer's (a live one
        keeps its unfinished entries fresh with ``keep``)."""
        idle = self.stream_settings.claim_idle_ms if min_idle_ms is None else min_idle_ms
        count = count or self.stream_settings.batch
        reply: Any = await self._group_call(
            stream,
            group,
            lambda: self.client.xautoclaim(stream, group, consumer, idle, "0-0", count=count),
            f"XAUTOCLAIM {stream}",
        )
        # [next id, entries, deleted ids]; an entry trimmed while pending comes back as nil
        # (Redis 6.2) or only among the deleted ids (Redis 7)
        entries = [e for e in (reply[1] if reply and len(reply) > 1 else []) if e]
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

    async def _group_call(
        self, stream: str, group: str, fn: Callable[[], Awaitable[R]], what: str
    ) -> R:
        """A call on ``group``; if Redis lost the group (a restart without its data), the group
        is created again and the call repeated once."""
        try:
            return await self.call(fn, what)
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("%s: group %s of %s is missing; creating it again", what, group, stream)
            await self.ensure_group(stream, group)
            return await self.call(fn, what)

    async def _deliveries(
        self, stream: str, group: str, entries: list[tuple[Any, Any]]
    ) -> list[Delivery]:
        good: list[Delivery] = []
        bad: list[str] = []
        expected = self.expect.get(stream)
        for raw_id, fields in entries:
            entry_id = _s(raw_id)
            if not fields:  # deleted (trimmed) while pending: nothing to deliver
                bad.append(entry_id)
                continue
            payload = fields.get(PAYLOAD_FIELD)
            try:
                if payload is None:
                    raise MessageDecodeError("entry", f"no {PAYLOAD_FIELD!r} field")
                msg = decode(payload, self.limits)
            except MessageDecodeError as exc:
                await self.dead_letter(stream, entry_id, payload or b"", exc.kind, str(exc))
                bad.append(entry_id)
                continue
            if expected is not None and not isinstance(msg, expected):
                detail = f"a {msg.TYPE} on a stream of {expected.TYPE}"  # type: ignore[attr-defined]
                await self.dead_letter(stream, entry_id, payload, "wrong_type", detail)
                bad.append(entry_id)
                continue
            good.append(Delivery(stream, entry_id, msg, payload))
        if bad:
            await self.ack(stream, group, bad)
        self.counters.delivered += len(good)
        return good

    async def reject(self, d: Delivery, group: str, reason: str, detail: str) -> None:
        """Dead-letter a delivered entry that its consumer cannot use, and ack it, so that it
        never comes back to this or any other consumer."""
        await self.dead_letter(d.stream, d.entry_id, d.payload, reason, detail)
        await self.ack(d.stream, group, [d.entry_id])

    async def dead_letter(
        self, stream: str, entry_id: str, payload: bytes, reason: str, detail: str = ""
    ) -> None:
        """Park a bad entry, with its reason (one of ``DEADLETTER_REASONS``) and a detail for
        people, on the run's dead-letter stream."""
        record: dict[Any, Any] = {
            b"source": stream.encode(),
            b"entry_id": entry_id.encode(),
            b"reason": f"{reason}: {detail}".encode(),
            b"payload": payload,
            b"at": repr(time.time()).encode(),
        }
        await self.call(lambda: self.client.xadd(self.keys.deadletter, record), "XADD deadletter")
        self.counters.deadlettered += 1
        self.counters.deadletter_reasons[reason] = (
            self.counters.deadletter_reasons.get(reason, 0) + 1
        )
        if self.on_deadletter is not None:
            self.on_deadletter(reason)
        log.warning("dead-lettered %s %s (%s): %s", stream, entry_id, reason, detail)

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
        await self._set_idle(stream, group, consumer, entry_ids, self.stream_settings.claim_idle_ms)

    async def keep(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
        """Mark entries that ``consumer`` is still working on as just delivered (idle 0), so no
        reclaim (which goes by idle time) takes them from a live consumer whose work takes longer
        than ``claim_idle_ms``; call it more often than that (``keep_every_s``)."""
        await self._set_idle(stream, group, consumer, entry_ids, 0)

    async def _set_idle(
        self, stream: str, group: str, consumer: str, entry_ids: list[str], idle: int
    ) -> None:
        """XCLAIM ... JUSTID: ``consumer`` owns the pending entries, idle ``idle`` ms (their
        delivery count unchanged; acknowledged ids are no longer pending and are skipped; a group
        that a Redis restart lost has nothing pending)."""
        if not entry_ids:
            return
        ids = list[Any](entry_ids)
        try:
            await self.call(
                lambda: self.client.xclaim(stream, group, consumer, 0, ids, idle=idle, justid=True),
                f"XCLAIM {stream}",
            )
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("%s/%s is gone (Redis lost it): nothing pending to mark", stream, group)

    @property
    def keep_every_s(self) -> float:
        """How often a consumer marks its unfinished entries as in work: every third of
        ``claim_idle_ms``."""
        return self.stream_settings.claim_idle_ms / 3000

    @property
    def default_reclaim_s(self) -> float:
        """How often a consumer looks for entries idle at dead consumers: every half of
        ``claim_idle_ms``."""
        return self.stream_settings.claim_idle_ms / 2000

    def consumer(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int | Callable[[], int] | None = None,
        stop: asyncio.Event | None = None,
        reclaim_every_s: float | None = None,
    ) -> Consumer:
        """``consumer``'s batches of ``stream`` (see ``Consumer``)."""
        return Consumer(self, stream, group, consumer, count, stop, reclaim_every_s)

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
        """Read -> handle -> ack until ``stop`` is set or ``max_messages`` were handled (the
        ``Consumer`` loop with acknowledgement after ``handler``, which must return only once
        the work is durable). Returns the number of entries handled."""
        await self.ensure_group(stream, group)
        handled = 0

        def count() -> int:
            batch = self.stream_settings.batch
            return batch if max_messages is None else min(batch, max_messages - handled)

        every = self.default_reclaim_s if reclaim_every_s is None else reclaim_every_s
        async for batch in self.consumer(
            stream, group, consumer, count=count, stop=stop, reclaim_every_s=every
        ):
            if batch:
                await handler(batch)
                await self.ack(stream, group, [d.entry_id for d in batch])
                handled += len(batch)
        return handled

    # -- introspection and trimming ------------------------------------------------------------

    async def groups(self, stream: str) -> list[dict[Any, Any]]:
        """XINFO GROUPS of ``stream``; empty when the stream does not exist (yet, or any more)."""
        try:
            reply: Any = await self.call(
                lambda: self.client.xinfo_groups(stream), f"XINFO GROUPS {stream}"
            )
        except rexc.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return []
            raise
        return list(reply or [])

    async def group_info(self, stream: str, group: str) -> GroupInfo:
        """Length, lag and pending count of ``group`` on ``stream`` (for metrics); all zero when
        the stream or the group is missing."""
        length = int(await self.call(lambda: self.client.xlen(stream), f"XLEN {stream}"))
        for g in await self.groups(stream):
            if _s(g["name"]) == group:
                lag = g.get("lag")
                return GroupInfo(
                    length=length,
                    lag=int(lag) if lag is not None else length,
                    pending=int(g["pending"]),
                    consumers=int(g["consumers"]),
                )
        return GroupInfo(length=length, lag=length, pending=0, consumers=0)

    async def entry_state(self, stream: str, group: str, entry_id: str) -> tuple[str, str | None]:
        """Where one entry stands for ``group``: ``("pending", consumer)``; ``("queued", None)``
        when it is in the stream but not yet delivered; ``("gone", None)`` when it was
        acknowledged or is no longer in the stream (trimmed, or lost in a Redis crash)."""
        pending: Any = await self._group_call(
            stream,
            group,
            lambda: self.client.xpending_range(stream, group, entry_id, entry_id, 1),
            f"XPENDING {stream}",
        )
        if pending:
            return "pending", _s(pending[0]["consumer"])
        present = await self.call(
            lambda: self.client.xrange(stream, entry_id, entry_id, count=1), f"XRANGE {stream}"
        )
        if not present:
            return "gone", None
        for g in await self.groups(stream):
            if _s(g["name"]) == group and _id_key(entry_id) > _id_key(_s(g["last-delivered-id"])):
                return "queued", None
        return "gone", None

    async def heartbeat(self, hb: Heartbeat, ttl_s: float) -> None:
        """Set ``hb.worker_id``'s heartbeat key, expiring after ``ttl_s``."""
        key, payload = self.keys.heartbeat_prefix + hb.worker_id, encode(hb)
        await self.call(
            lambda: self.client.set(key, payload, px=int(ttl_s * 1000)), "SET heartbeat"
        )

    async def announce_weights(self, payload: bytes) -> None:
        """Set the run's latest weight announcement (an encoded ``WeightAnnouncement``) and
        publish it on the weights channel."""
        key = self.keys.weights
        await self.call(lambda: self.client.set(key, payload), "SET weights")
        await self.call(lambda: self.client.publish(key, payload), "PUBLISH weights")

    async def latest_weights(self) -> bytes | None:
        """The raw latest weight announcement, or None before the first one."""
        key = self.keys.weights
        raw: Any = await self.call(lambda: self.client.get(key), "GET weights")
        return bytes(raw) if raw else None

    async def weight_announcements(self, timeout_s: float) -> AsyncIterator[bytes | None]:
        """Announcements as they are published on the weights channel (pub/sub), yielding None
        once the subscription is in place (what was announced before it is only in the key: read
        it now) and every ``timeout_s`` without an announcement, so the caller can poll the key
        as well. Ends when the subscription breaks (Redis away): the caller falls back to polling
        and subscribes again."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.weights)
            yield None
            while True:
                msg = await pubsub.get_message(timeout=timeout_s)
                yield bytes(msg["data"]) if msg and msg.get("type") == "message" else None
        except _RETRYABLE as exc:
            log.info("weights channel: %s; polling the key until subscribed again", exc)
        finally:
            with contextlib.suppress(*_RETRYABLE):
                # untyped before redis-py 8.2, typed since: Any keeps mypy quiet on both
                await cast(Any, pubsub).aclose()

    async def advertise_weights(
        self, worker_id: str, version: int, url: str, machine: str = "", directory: str = ""
    ) -> None:
        """Tell receivers that ``worker_id`` holds a verified ``version``: served at ``url`` (a
        relay; '' = not served) and, for samplers of the same ``machine``, in ``directory``."""
        value = json.dumps(
            {
                "version": version,
                "url": url,
                "machine": machine,
                "dir": directory,
                "at": time.time(),
            }
        )
        key = self.keys.weight_sources
        await self.call(lambda: self.client.hset(key, worker_id, value), "HSET weight-sources")

    async def withdraw_weights(self, worker_id: str) -> None:
        key = self.keys.weight_sources
        await self.call(lambda: self.client.hdel(key, worker_id), "HDEL weight-sources")

    async def _holders(self, version: int, max_age_s: float) -> list[dict[str, Any]]:
        key = self.keys.weight_sources
        raw: Any = await self.call(lambda: self.client.hgetall(key), "HGETALL weight-sources")
        out = []
        now = time.time()
        for value in (raw or {}).values():
            try:
                entry = json.loads(value)
                if int(entry["version"]) == version and now - float(entry["at"]) < max_age_s:
                    out.append(entry)
            except (ValueError, KeyError, TypeError):
                continue
        return out

    async def weight_sources(self, version: int, max_age_s: float = 3600.0) -> list[str]:
        """URLs of the relays advertising ``version`` (advertised within ``max_age_s``)."""
        return [str(e["url"]) for e in await self._holders(version, max_age_s) if e.get("url")]

    async def weight_copies(
        self, version: int, machine: str, max_age_s: float = 3600.0
    ) -> list[str]:
        """Directories of the verified copies of ``version`` that samplers of ``machine`` hold."""
        return [
            str(e["dir"])
            for e in await self._holders(version, max_age_s)
            if e.get("dir") and e.get("machine") == machine
        ]

    def _fetch_lease_key(self, machine: str, version: int) -> str:
        tag = hashlib.sha256(machine.encode()).hexdigest()[:16]
        return f"{self.keys.weight_fetch_prefix}{tag}:{version}"

    async def claim_weight_fetch(
        self, machine: str, version: int, owner: str, ttl_s: float
    ) -> bool:
        """Take the lease to fetch ``version`` for ``machine`` (its other samplers wait for the
        copy); False when another sampler holds it. It lapses after ``ttl_s`` unless renewed.
        (SET and GET only: what the sampler's ACL user may run.)"""
        key = self._fetch_lease_key(machine, version)
        ok = await self.call(
            lambda: self.client.set(key, owner, nx=True, px=int(ttl_s * 1000)), "SET fetch lease"
        )
        return bool(ok)

    async def renew_weight_fetch(
        self, machine: str, version: int, owner: str, ttl_s: float, *, release: bool = False
    ) -> bool:
        """Extend a lease ``owner`` holds by ``ttl_s`` (``release``: let it lapse at once);
        False when it lapsed or is another's. Not atomic: a lease taken over between the read
        and the write costs at most one extra fetch of the version."""
        key = self._fetch_lease_key(machine, version)
        held: Any = await self.call(lambda: self.client.get(key), "GET fetch lease")
        if held is None or held.decode() != owner:
            return False
        px = 1 if release else int(ttl_s * 1000)
        ok = await self.call(lambda: self.client.set(key, owner, xx=True, px=px), "SET fetch lease")
        return bool(ok)

    async def release_weight_fetch(self, machine: str, version: int, owner: str) -> None:
        """Give a lease ``owner`` holds back (another sampler of the machine may take it)."""
        await self.renew_weight_fetch(machine, version, owner, 0.0, release=True)

    async def heartbeats(self) -> list[Heartbeat]:
        """Every heartbeat key of the run that decodes as a heartbeat (live or ``stopped``)."""
        pattern = self.keys.heartbeat_prefix + "*"

        async def scan() -> list[Any]:
            return [k async for k in self.client.scan_iter(match=pattern)]

        keys = await self.call(scan, "SCAN heartbeats")
        if not keys:
            return []
        values: Any = await self.call(lambda: self.client.mget(keys), "MGET heartbeats")
        out = []
        for raw in values:
            if not raw:
                continue  # expired between SCAN and MGET
            try:
                out.append(decode_as(raw, Heartbeat))
            except MessageDecodeError:
                continue  # not a heartbeat: ignored here, as by ``alive``
        return out

    async def newest(self, stream: str) -> bytes | None:
        """The payload of the newest entry of ``stream``, or None when it is empty."""
        entries: Any = await self.call(
            lambda: self.client.xrevrange(stream, count=1), f"XREVRANGE {stream}"
        )
        return bytes(entries[0][1][PAYLOAD_FIELD]) if entries else None

    async def alive(self, worker_ids: list[str]) -> set[str]:
        """The workers among ``worker_ids`` whose heartbeat key says they are running."""
        if not worker_ids:
            return set()
        keys = [self.keys.heartbeat_prefix + w for w in worker_ids]
        values: Any = await self.call(lambda: self.client.mget(keys), "MGET heartbeats")
        out = set()
        for worker, raw in zip(worker_ids, values or []):
            try:
                if raw and decode_as(raw, Heartbeat).state == "running":
                    out.add(worker)
            except MessageDecodeError:
                continue
        return out

    async def trim_acknowledged(self, stream: str) -> int:
        """Delete entries that every consumer group has acknowledged; never an entry a group has
        yet to read or ack. Returns the number of entries removed."""
        groups = await self.groups(stream)
        if not groups:
            return 0
        floor: tuple[int, int] | None = None
        for g in groups:
            bound = _id_key(_s(g["last-delivered-id"]))
            if int(g["pending"]) > 0:

                async def pending_summary(name: Any = g["name"]) -> Any:
                    return await self.client.xpending(stream, name)

                summary = await self.call(pending_summary, f"XPENDING {stream}")
                # the summary can be empty even though XINFO counted pending entries: they were
                # acknowledged in between (then last-delivered-id is the bound)
                if summary and summary.get("min") is not None:
                    bound = min(bound, _id_key(_s(summary["min"])))
            floor = bound if floor is None else min(floor, bound)
        if floor is None or floor == (0, 0):
            return 0
        minid = f"{floor[0]}-{floor[1]}"
        removed = await self.call(
            lambda: self.client.xtrim(stream, minid=minid, approximate=False), f"XTRIM {stream}"
        )
        return int(removed)


class Consumer:
    """The one consumer loop of the processes, as an async iterator of batches.

    First this consumer's own pending entries, paged (a restarted process resumes what it had
    read but not acknowledged), then new entries, blocking up to ``block_ms``; with
    ``reclaim_every_s`` it first takes, at most that often, entries idle at other (dead)
    consumers. A read that timed out yields an empty batch, so the caller can do its periodic
    work. Acknowledging is the caller's, once its work is durable. The iteration ends when
    ``stop`` is set or ``count`` (entries wanted per batch; a callable is asked before each read)
    is 0: a bounded mode for tests and ``--max-*`` runs.
    """

    def __init__(
        self,
        streams: Streams,
        stream: str,
        group: str,
        consumer: str,
        count: int | Callable[[], int] | None,
        stop: asyncio.Event | None,
        reclaim_every_s: float | None,
    ) -> None:
        self.streams, self.stream, self.group, self.name = streams, stream, group, consumer
        self.count = count
        self.stop = stop
        self.reclaim_every_s = reclaim_every_s
        self.after: str | None = "0"
        """Last own pending entry read; None once they are all read."""
        self.last_reclaim = -math.inf

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> list[Delivery]:
        want = self.count() if callable(self.count) else self.count
        if want is None:
            want = self.streams.stream_settings.batch
        if want <= 0 or (self.stop is not None and self.stop.is_set()):
            raise StopAsyncIteration
        s = self.streams
        if self.after is not None:
            batch = await s.read(
                self.stream, self.group, self.name, want, pending=True, after=self.after
            )
            if batch:
                self.after = batch[-1].entry_id
                return batch
            self.after = None
        every = self.reclaim_every_s
        if every is not None and time.monotonic() - self.last_reclaim >= every:
            self.last_reclaim = time.monotonic()
            batch = await s.reclaim(self.stream, self.group, self.name, count=want)
            if batch:
                return batch
        return await s.read(self.stream, self.group, self.name, want)
