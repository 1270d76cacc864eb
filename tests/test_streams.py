"""Redis Streams transport against a real redis-server."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal

import pytest

from pipeline.errors import Stopping, TransportError
from pipeline.wire.messages import SCHEMA_VERSION, DecodeLimits, Heartbeat, PromptTask, encode
from pipeline.wire.streams import PAYLOAD_FIELD, Delivery, Streams
from tests.helpers import make_streams
from tests.services import RedisServer

GROUP = "samplers"


def prompt(i: int) -> PromptTask:
    return PromptTask(f"p{i}", [1, 2, i % 1000], str(i), i, 0, "arith", 1000.0 + i)


async def publish_n(s: Streams, n: int, start: int = 0) -> list[str]:
    return [await s.publish(s.keys.prompts, prompt(i)) for i in range(start, start + n)]


def ids_of(deliveries: list[Delivery]) -> list[str]:
    return [d.message.prompt_id for d in deliveries]  # type: ignore[union-attr]


def test_publish_consume_ack(redis_server: RedisServer) -> None:
    async def main() -> None:
        s = make_streams(redis_server)
        await s.ensure_group(s.keys.prompts, GROUP)
        await s.ensure_group(s.keys.prompts, GROUP)  # idempotent
        await publish_n(s, 5)
        got = await s.read(s.keys.prompts, GROUP, "c1", count=10)
        assert ids_of(got) == [f"p{i}" for i in range(5)]
        assert [d.message for d in got] == [prompt(i) for i in range(5)]
        info = await s.group_info(s.keys.prompts, GROUP)
        assert (info.length, info.lag, info.pending) == (5, 0, 5)
        assert await s.ack(s.keys.prompts, GROUP, [d.entry_id for d in got]) == 5
        info = await s.group_info(s.keys.prompts, GROUP)
        assert info.pending == 0
        assert await s.read(s.keys.prompts, GROUP, "c1", block_ms=50) == []
        await s.close()

    asyncio.run(main())


def test_consume_loop_bounded_and_acks_after_handler(redis_server: RedisServer) -> None:
    async def main() -> None:
        s = make_streams(redis_server, batch=3)
        await s.ensure_group(s.keys.prompts, GROUP)
        await publish_n(s, 10)
        seen: list[str] = []

        async def handler(batch: list[Delivery]) -> None:
            # nothing of this batch is acked before the handler returns
            info = await s.group_info(s.keys.prompts, GROUP)
            assert info.pending >= len(batch)
            seen.extend(ids_of(batch))

        n = await s.consume(s.keys.prompts, GROUP, "c1", handler, max_messages=7)
        assert n == 7 and seen == [f"p{i}" for i in range(7)]
        info = await s.group_info(s.keys.prompts, GROUP)
        assert (info.pending, info.lag) == (0, 3)
        await s.close()

    asyncio.run(main())


def test_two_consumers_share_work_without_duplicates(redis_server: RedisServer) -> None:
    async def main() -> None:
        s = make_streams(redis_server, batch=2)
        await s.ensure_group(s.keys.prompts, GROUP)
        await publish_n(s, 40)
        seen: dict[str, list[str]] = {"a": [], "b": []}

        def handler_for(name: str):  # type: ignore[no-untyped-def]
            async def handler(batch: list[Delivery]) -> None:
                seen[name].extend(ids_of(batch))
                await asyncio.sleep(0.005)

            return handler

        stop = asyncio.Event()

        async def stopper() -> None:
            while len(seen["a"]) + len(seen["b"]) < 40:
                await asyncio.sleep(0.01)
            stop.set()

        await asyncio.gather(
            s.consume(s.keys.prompts, GROUP, "a", handler_for("a"), stop=stop),
            s.consume(s.keys.prompts, GROUP, "b", handler_for("b"), stop=stop),
            stopper(),
        )
        assert seen["a"] and seen["b"], "both consumers got work"
        all_ids = seen["a"] + seen["b"]
        assert sorted(all_ids) == sorted(f"p{i}" for i in range(40))
        assert len(set(all_ids)) == 40
        await s.close()

    asyncio.run(main())


def _consume_forever_then_die(url: str, ready: multiprocessing.synchronize.Event) -> None:
    """Child process: claim entries, signal, and hang without acking (killed by the parent)."""
    from pipeline.config import RedisSettings, RunSettings, StreamSettings

    async def main() -> None:
        s = Streams(RedisSettings(url=url), RunSettings(name="test"), StreamSettings(block_ms=100))
        got = await s.read(s.keys.prompts, GROUP, "doomed", count=4)
        assert len(got) == 4
        ready.set()
        await asyncio.sleep(3600)

    asyncio.run(main())


def test_killed_consumer_entries_are_reclaimed(redis_server: RedisServer) -> None:
    async def setup() -> None:
        s = make_streams(redis_server)
        await s.ensure_group(s.keys.prompts, GROUP)
        await publish_n(s, 6)
        await s.close()

    asyncio.run(setup())
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_consume_forever_then_die, args=(redis_server.url, ready))
    child.start()
    assert ready.wait(60)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join(10)

    async def survivor() -> None:
        s = make_streams(redis_server, claim_idle_ms=200)
        info = await s.group_info(s.keys.prompts, GROUP)
        assert info.pending == 4
        assert await s.reclaim(s.keys.prompts, GROUP, "survivor") == []  # not idle long enough
        await asyncio.sleep(0.3)
        seen: list[str] = []

        async def handler(batch: list[Delivery]) -> None:
            seen.extend(ids_of(batch))

        n = await s.consume(
            s.keys.prompts, GROUP, "survivor", handler, max_messages=6, reclaim_every_s=0
        )
        assert n == 6 and sorted(seen) == sorted(f"p{i}" for i in range(6))
        assert s.counters.reclaimed == 4
        assert (await s.group_info(s.keys.prompts, GROUP)).pending == 0
        await s.close()

    asyncio.run(survivor())


def test_entries_a_live_consumer_keeps_are_not_reclaimed(redis_server: RedisServer) -> None:
    """Reclaim goes by idle time: an entry that its consumer is still working on (marked with
    ``keep`` more often than ``claim_idle_ms``) stays with it, with its delivery count; one it
    stopped keeping is reclaimed; an acknowledged one is not taken back by ``keep``."""

    async def main() -> None:
        s = make_streams(redis_server, claim_idle_ms=300)
        await s.ensure_group(s.keys.prompts, GROUP)
        await publish_n(s, 3)
        mine = await s.read(s.keys.prompts, GROUP, "worker", count=3)
        kept, dropped, done = (d.entry_id for d in mine)
        await s.ack(s.keys.prompts, GROUP, [done])
        for _ in range(4):  # 0.6 s of work, twice claim_idle_ms
            await asyncio.sleep(0.15)
            await s.keep(s.keys.prompts, GROUP, "worker", [kept, done])
        taken = await s.reclaim(s.keys.prompts, GROUP, "thief")
        assert [d.entry_id for d in taken] == [dropped]
        pending = await s.client.xpending_range(s.keys.prompts, GROUP, "-", "+", 10)
        owners = {
            p["message_id"].decode(): (p["consumer"].decode(), p["times_delivered"])
            for p in pending
        }
        assert owners == {kept: ("worker", 1), dropped: ("thief", 2)}
        await s.close()

    asyncio.run(main())


def test_marking_entries_of_a_group_redis_lost_is_a_no_op(redis_server: RedisServer) -> None:
    """After a Redis restart without persistence the group is gone with its pending entries:
    ``keep`` and ``release`` have nothing to mark and must not fail the consumer; any other
    error still reaches the caller."""
    from redis.exceptions import ResponseError

    async def main() -> None:
        s = make_streams(redis_server, run="lost-group")
        await s.ensure_group(s.keys.prompts, GROUP)
        await publish_n(s, 1)
        [d] = await s.read(s.keys.prompts, GROUP, "worker", count=1)
        await s.client.xgroup_destroy(s.keys.prompts, GROUP)
        await s.keep(s.keys.prompts, GROUP, "worker", [d.entry_id])
        await s.release(s.keys.prompts, GROUP, "worker", [d.entry_id])
        await s.client.delete(s.keys.prompts)
        await s.client.set(s.keys.prompts, b"not a stream")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await s.keep(s.keys.prompts, GROUP, "worker", [d.entry_id])
        await s.client.delete(s.keys.prompts)
        await s.close()

    asyncio.run(main())


def test_malformed_entries_go_to_dead_letter_and_consumer_goes_on(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        s = make_streams(redis_server)
        await s.ensure_group(s.keys.prompts, GROUP)
        await s.publish(s.keys.prompts, prompt(1))
        await s.client.xadd(s.keys.prompts, {PAYLOAD_FIELD: b"\x93garbage"})
        await s.client.xadd(s.keys.prompts, {b"other": b"x"})
        old = SCHEMA_VERSION - 1  # a peer of the previous release
        here = b"schema_version" + bytes([SCHEMA_VERSION])
        bad_version = encode(prompt(9)).replace(here, b"schema_version" + bytes([old]))
        await s.client.xadd(s.keys.prompts, {PAYLOAD_FIELD: bad_version})
        await s.publish(s.keys.prompts, prompt(2))
        got = await s.read(s.keys.prompts, GROUP, "c", count=10)
        assert ids_of(got) == ["p1", "p2"]
        assert s.counters.deadlettered == 3
        dead = await s.client.xrange(s.keys.deadletter)
        reasons = [f[b"reason"].decode() for _, f in dead]
        assert reasons[0].startswith("decode: message: not valid msgpack")
        assert reasons[1].startswith("decode: entry: no")
        assert reasons[2].startswith(
            f"decode: schema_version: unknown version {old}; this build reads {SCHEMA_VERSION}"
        )
        assert s.counters.deadletter_reasons == {"decode": 3}
        assert dead[2][1][b"payload"] == bad_version
        assert dead[0][1][b"source"] == s.keys.prompts.encode()
        # bad entries are acked, good ones still pending for the consumer
        assert (await s.group_info(s.keys.prompts, GROUP)).pending == 2
        await s.close()

    asyncio.run(main())


def test_trim_never_drops_unacknowledged_entries(redis_server: RedisServer) -> None:
    async def main() -> None:
        s = make_streams(redis_server)
        s.expect.clear()  # prompt messages stand in for trees: this test is about trimming
        await s.ensure_group(s.keys.trees, "learner")
        await s.ensure_group(s.keys.trees, "auditor")
        await publish_n_to(s, s.keys.trees, 10)
        a = await s.read(s.keys.trees, "learner", "l", count=6)
        await s.ack(s.keys.trees, "learner", [d.entry_id for d in a[:4]])
        # learner: 0-3 acked, 4-5 pending, 6-9 unread; auditor: nothing read
        assert await s.trim_acknowledged(s.keys.trees) == 0
        b = await s.read(s.keys.trees, "auditor", "x", count=10)
        await s.ack(s.keys.trees, "auditor", [d.entry_id for d in b])
        assert await s.trim_acknowledged(s.keys.trees) == 4  # entries 0-3: acked by both
        rest = await s.client.xrange(s.keys.trees)
        assert [e[0].decode() for e in rest] == [d.entry_id for d in b[4:]]
        await s.ack(s.keys.trees, "learner", [d.entry_id for d in a[4:]])
        c = await s.read(s.keys.trees, "learner", "l", count=10)
        assert len(c) == 4  # the unread ones survived
        await s.close()

    async def publish_n_to(s: Streams, stream: str, n: int) -> None:
        for i in range(n):
            await s.publish(stream, prompt(i))

    asyncio.run(main())


def test_redis_restart_loses_no_accepted_entry(redis_server: RedisServer) -> None:
    """A producer keeps publishing while Redis is killed (SIGKILL) and restarted on the same
    append-only data: every XADD that returned is still there, and the producer rode out the gap
    with retries."""

    async def main() -> None:
        s = make_streams(redis_server)
        await s.ensure_group(s.keys.prompts, GROUP)
        accepted: list[str] = []

        async def producer() -> None:
            for i in range(60):
                await s.publish(s.keys.prompts, prompt(i))
                accepted.append(f"p{i}")
                await asyncio.sleep(0.005)

        async def chaos() -> None:
            while len(accepted) < 20:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(redis_server.kill)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(redis_server.start)

        await asyncio.gather(producer(), chaos())
        assert s.counters.retries > 0, "the restart happened while publishing"
        got = await s.read(s.keys.prompts, GROUP, "c", count=1000)
        ids = ids_of(got)
        assert set(accepted) <= set(ids)
        assert len(accepted) == 60
        await s.close()

    asyncio.run(main())


def test_poison_entries_of_the_wrong_type_or_vocabulary_are_dead_lettered(
    redis_server: RedisServer,
) -> None:
    """A valid message of another stream's type, and token ids outside the vocabulary, are
    dead-lettered with their reason and acked; the good entries around them are delivered."""

    async def main() -> None:
        s = make_streams(redis_server)
        s.limits = DecodeLimits(vocab_size=100)
        seen: list[str] = []
        s.on_deadletter = seen.append
        await s.ensure_group(s.keys.prompts, GROUP)
        await s.publish(s.keys.prompts, prompt(1))
        await s.publish(s.keys.prompts, Heartbeat("w", "sampler", "h", 1, 0, 0.0))
        await s.publish(s.keys.prompts, PromptTask("p-big", [5, 100], "1", 0, 0))
        await s.publish(s.keys.prompts, prompt(2))
        got = await s.read(s.keys.prompts, GROUP, "c", count=10)
        assert ids_of(got) == ["p1", "p2"]
        assert seen == ["wrong_type", "bad_token"]
        dead = await s.client.xrange(s.keys.deadletter)
        assert dead[0][1][b"reason"].startswith(b"wrong_type: a heartbeat on a stream of prompt")
        assert b"token id 100 outside [0, 100)" in dead[1][1][b"reason"]
        assert (await s.group_info(s.keys.prompts, GROUP)).pending == 2
        # a consumer's own rejection: dead-lettered with the entry's bytes, acked
        await s.reject(got[0], GROUP, "too_long", "prompt p1 does not fit")
        dead = await s.client.xrange(s.keys.deadletter)
        assert dead[-1][1][b"payload"] == got[0].payload == encode(prompt(1))
        assert (await s.group_info(s.keys.prompts, GROUP)).pending == 1
        await s.close()

    asyncio.run(main())


def test_trim_survives_acks_racing_the_pending_summary(redis_server: RedisServer) -> None:
    """XINFO counts pending entries, then an ack empties the pending list before XPENDING runs
    (the summary has no minimum): trimming goes on with the last delivered id."""

    async def main() -> None:
        s = make_streams(redis_server)
        await s.ensure_group(s.keys.prompts, GROUP)
        await publish_n(s, 4)
        got = await s.read(s.keys.prompts, GROUP, "c", count=4)
        real_xinfo = s.client.xinfo_groups

        async def stale_xinfo(stream: str) -> object:
            groups = await real_xinfo(stream)
            await s.ack(s.keys.prompts, GROUP, [d.entry_id for d in got])  # the race
            return groups

        s.client.xinfo_groups = stale_xinfo  # type: ignore[method-assign]
        assert (await real_xinfo(s.keys.prompts))[0]["pending"] == 4
        removed = await s.trim_acknowledged(s.keys.prompts)
        assert removed == 3  # everything below the last delivered id
        s.client.xinfo_groups = real_xinfo  # type: ignore[method-assign]
        await s.close()

    asyncio.run(main())


def test_replies_after_redis_lost_streams_and_groups(redis_server: RedisServer) -> None:
    """After a Redis restart without the data: XINFO on a missing stream, XREADGROUP and
    XAUTOCLAIM on a missing group, XAUTOCLAIM of entries trimmed while pending."""

    async def main() -> None:
        s = make_streams(redis_server)
        assert await s.trim_acknowledged(s.keys.trees) == 0  # no such stream
        info = await s.group_info(s.keys.trees, "learner")
        assert (info.length, info.pending, info.consumers) == (0, 0, 0)
        # the group vanished: read and reclaim create it again instead of crashing
        await publish_n(s, 2)
        got = await s.read(s.keys.prompts, GROUP, "c", count=10)
        assert ids_of(got) == ["p0", "p1"]  # a group made again reads from the stream's start
        await s.client.delete(s.keys.prompts)
        assert await s.reclaim(s.keys.prompts, GROUP, "c", min_idle_ms=0) == []
        await publish_n(s, 3)
        got = await s.read(s.keys.prompts, GROUP, "c", count=10)
        assert len(got) == 3
        # entries trimmed while pending: XAUTOCLAIM reports them deleted, nothing is delivered
        await s.client.xtrim(s.keys.prompts, maxlen=0)
        assert await s.reclaim(s.keys.prompts, GROUP, "d", min_idle_ms=0) == []
        await s.close()

    asyncio.run(main())


def test_stop_interrupts_retries_while_redis_is_down(redis_server: RedisServer) -> None:
    """With Redis gone, a call retrying with backoff ends with ``Stopping`` as soon as the stop
    event is set, and later calls make one short attempt."""

    async def main() -> None:
        s = make_streams(redis_server)
        s.stop = asyncio.Event()
        await s.ensure_group(s.keys.prompts, GROUP)
        redis_server.kill()
        started = asyncio.get_running_loop().time()
        asyncio.get_running_loop().call_later(0.5, s.stop.set)
        with pytest.raises(Stopping):
            await s.publish(s.keys.prompts, prompt(1))
        assert asyncio.get_running_loop().time() - started < 2.0
        with pytest.raises(TransportError):
            await s.ack(s.keys.prompts, GROUP, ["1-0"])
        assert asyncio.get_running_loop().time() - started < 4.0
        await s.close()

    asyncio.run(main())


def test_entry_state_and_liveness(redis_server: RedisServer) -> None:
    async def main() -> None:
        s = make_streams(redis_server)
        await s.ensure_group(s.keys.prompts, GROUP)
        a, b, c = await publish_n(s, 3)
        got = await s.read(s.keys.prompts, GROUP, "w1", count=2)
        await s.ack(s.keys.prompts, GROUP, [got[0].entry_id])
        assert await s.entry_state(s.keys.prompts, GROUP, a) == ("gone", None)
        assert await s.entry_state(s.keys.prompts, GROUP, b) == ("pending", "w1")
        assert await s.entry_state(s.keys.prompts, GROUP, c) == ("queued", None)
        await s.client.xdel(s.keys.prompts, c)
        assert await s.entry_state(s.keys.prompts, GROUP, c) == ("gone", None)
        hb = Heartbeat("w1", "sampler", "h", 1, 0, 0.0, "running")
        await s.client.set(s.keys.heartbeat_prefix + "w1", encode(hb))
        await s.client.set(s.keys.heartbeat_prefix + "w2", b"garbage")
        assert await s.alive(["w1", "w2", "w3"]) == {"w1"}
        await s.close()

    asyncio.run(main())


def test_consumer_resumes_own_pending_first_then_new_and_ends_on_count_or_stop(
    redis_server: RedisServer,
) -> None:
    """The processes' one loop: a consumer restarted under its name first gets back what it had
    read but not acked (paged), then new entries; an empty batch when a read times out; it ends
    when the wanted count reaches 0 or the stop event is set."""

    async def main() -> None:
        s = make_streams(redis_server)
        await s.ensure_group(s.keys.prompts, GROUP)
        await publish_n(s, 5)
        first = await s.read(s.keys.prompts, GROUP, "w", count=5)  # read, never acked: a crash
        assert len(first) == 5
        await publish_n(s, 2, start=5)
        batches = []
        async for batch in s.consumer(s.keys.prompts, GROUP, "w", count=2):
            batches.append(ids_of(batch))
            if len(batches) == 5:
                break
        assert batches == [["p0", "p1"], ["p2", "p3"], ["p4"], ["p5", "p6"], []]
        left = iter([3, 0])
        got = [b async for b in s.consumer(s.keys.prompts, GROUP, "x", count=lambda: next(left))]
        assert got == [[]]  # one read (nothing new), then the count reached 0
        stop = asyncio.Event()
        stop.set()
        assert [b async for b in s.consumer(s.keys.prompts, GROUP, "x", stop=stop)] == []
        await s.close()

    asyncio.run(main())
