"""Redis Streams transport against a real redis-server."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal

from pipeline.messages import PromptTask, encode
from pipeline.streams import PAYLOAD_FIELD, Delivery, Streams
from tests.conftest import make_streams
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


def test_malformed_entries_go_to_dead_letter_and_consumer_goes_on(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        s = make_streams(redis_server)
        await s.ensure_group(s.keys.prompts, GROUP)
        await s.publish(s.keys.prompts, prompt(1))
        await s.client.xadd(s.keys.prompts, {PAYLOAD_FIELD: b"\x93garbage"})
        await s.client.xadd(s.keys.prompts, {b"other": b"x"})
        bad_version = encode(prompt(9)).replace(b"schema_version\x01", b"schema_version\x07")
        await s.client.xadd(s.keys.prompts, {PAYLOAD_FIELD: bad_version})
        await s.publish(s.keys.prompts, prompt(2))
        got = await s.read(s.keys.prompts, GROUP, "c", count=10)
        assert ids_of(got) == ["p1", "p2"]
        assert s.counters.deadlettered == 3
        dead = await s.client.xrange(s.keys.deadletter)
        reasons = [f[b"reason"].decode() for _, f in dead]
        assert reasons[0].startswith("message: not valid msgpack")
        assert reasons[1].startswith("entry: no")
        assert reasons[2].startswith("schema_version: unknown version 7")
        assert dead[2][1][b"payload"] == bad_version
        assert dead[0][1][b"source"] == s.keys.prompts.encode()
        # bad entries are acked, good ones still pending for the consumer
        assert (await s.group_info(s.keys.prompts, GROUP)).pending == 2
        await s.close()

    asyncio.run(main())


def test_trim_never_drops_unacknowledged_entries(redis_server: RedisServer) -> None:
    async def main() -> None:
        s = make_streams(redis_server)
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
