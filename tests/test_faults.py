"""The fault suite: a real pipeline (redis-server from ops/ with its ACL users, one learner, two
samplers, the toy model) takes poison messages on both streams, SIGKILLs of a sampler, of the
learner and of redis-server, and SIGTERMs while Redis is down; it must end with every admitted
prompt trained or dropped-and-counted exactly once (checked from the learner's checkpoint and
step log by ``learner.ledger.audit``), every poison message dead-lettered with its reason, and
every stop within 5 s."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from pydantic import SecretStr

from bench.cluster import PASSWORDS, Cluster
from learner.ledger import Ledger, audit
from pipeline.config import RedisSettings, RunSettings, StreamSettings
from pipeline.wire.messages import (
    Heartbeat,
    PromptTask,
    RolloutLeaf,
    RolloutNode,
    TreeRollout,
    decode,
    encode,
)
from pipeline.wire.streams import PAYLOAD_FIELD, Streams

pytestmark = pytest.mark.slow

SETTINGS = {
    "TREEPO_RUN__NAME": "faults",
    "TREEPO_RUN__MAX_STALENESS": "1",
    "TREEPO_TREE__WIDTH": "4",
    "TREEPO_TREE__SEGMENT_TOKENS": "6",
    "TREEPO_TREE__MAX_DEPTH": "6",
    "TREEPO_SAMPLER__TREES_IN_FLIGHT": "2",
    "TREEPO_SAMPLER__ALLOW_SHORT_SEGMENTS": "true",
    "TREEPO_LEARNER__BATCH_PROMPTS": "3",
    "TREEPO_LEARNER__TOTAL_STEPS": "26",
    "TREEPO_LEARNER__LR": "1e-4",
    "TREEPO_LEARNER__DYNAMIC_SAMPLING": "false",
    "TREEPO_LEARNER__READMIT_AFTER_S": "5",
    "TREEPO_STREAMS__BLOCK_MS": "200",
    "TREEPO_STREAMS__CLAIM_IDLE_MS": "5000",
}


def streams_as(cluster: Cluster, role: str) -> Streams:
    return Streams(
        RedisSettings(
            url=f"redis://127.0.0.1:{cluster.redis_port}/0",
            username=role,
            password=SecretStr(PASSWORDS[role]),
            retry_attempts=20,
            retry_max_delay_s=0.5,
        ),
        RunSettings(name=SETTINGS["TREEPO_RUN__NAME"]),
        StreamSettings(),
    )


def wait_for(what: str, cond: Callable[[], bool], cluster: Cluster, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        assert cluster.running("learner"), cluster.log_tail("learner")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{cluster.log_tail('learner')}")


def tiny_tree(prompt_id: str) -> TreeRollout:
    return TreeRollout(
        [1, 2],
        [RolloutNode(-1, [3, 4], [-0.1, -0.2], 0)],
        [RolloutLeaf(0, 1.0, "eos")],
        tree_id=f"t-{prompt_id}",
        prompt_id=prompt_id,
        sampler_id="intruder",
    )


async def lose_first_prompt(cluster: Cluster) -> str:
    """Delete the first prompt entry the learner admits, before the samplers are up."""
    s = streams_as(cluster, "learner")
    try:
        for _ in range(600):
            entries = await s.client.xrange(s.keys.prompts, count=1)
            if entries:
                await s.client.xdel(s.keys.prompts, entries[0][0])
                return str(decode(entries[0][1][PAYLOAD_FIELD]).prompt_id)  # type: ignore[union-attr]
            await asyncio.sleep(0.1)
        raise AssertionError("the learner admitted no prompt:\n" + cluster.log_tail("learner"))
    finally:
        await s.close()


async def inject_poison(cluster: Cluster) -> dict[str, str]:
    """One poison entry of each kind on each stream; returns entry id -> expected reason."""
    learner, sampler = streams_as(cluster, "learner"), streams_as(cluster, "sampler")
    k = learner.keys
    # a tree for an admitted prompt (the newest, before any poison lands on the stream), but
    # sampled with top-p < 1
    admitted = await learner.client.xrevrange(k.prompts, count=1)
    nucleus = replace(
        tiny_tree(decode(admitted[0][1][PAYLOAD_FIELD]).prompt_id),  # type: ignore[union-attr]
        top_p=0.9,
    )
    expected = {}
    for msg, reason in (
        (Heartbeat("x", "sampler", "h", 1, 0, 0.0), "wrong_type"),
        (PromptTask("poison-long", [5] * 5000, "1", 0, 0, "arith"), "too_long"),
        (PromptTask("poison-task", [5, 6], "1", 0, 0, "nosuch"), "unknown_task"),
        (PromptTask("poison-vocab", [5, 10**6], "1", 0, 0, "arith"), "bad_token"),
    ):
        expected[await learner.publish(k.prompts, msg)] = reason
    garbage = await learner.client.xadd(k.prompts, {PAYLOAD_FIELD: b"\xc1garbage"})
    expected[garbage.decode()] = "decode"
    for msg, reason in (
        (PromptTask("p", [1], "1", 0, 0), "wrong_type"),
        (tiny_tree("never-admitted"), "unknown_prompt"),
        (nucleus, "sampling"),
    ):
        expected[await sampler.publish(k.trees, msg)] = reason
    garbage = await sampler.client.xadd(k.trees, {PAYLOAD_FIELD: encode(tiny_tree("x"))[:-9]})
    expected[garbage.decode()] = "decode"
    await learner.close()
    await sampler.close()
    return expected


async def dead_letters(cluster: Cluster) -> dict[str, str]:
    s = streams_as(cluster, "learner")
    entries = await s.client.xrange(s.keys.deadletter)
    await s.close()
    return {f[b"entry_id"].decode(): f[b"reason"].decode() for _, f in entries}


async def acl_denials(cluster: Cluster) -> list[str]:
    """What the sampler's credentials are refused (each must be)."""
    from redis.exceptions import NoPermissionError

    s = streams_as(cluster, "sampler")
    refused = []
    for what, call in (
        ("FLUSHALL", lambda: s.client.flushall()),
        ("XADD prompts", lambda: s.client.xadd(s.keys.prompts, {PAYLOAD_FIELD: b"x"})),
        ("DEL trees", lambda: s.client.delete(s.keys.trees)),
        ("SET weights", lambda: s.client.set(s.keys.weights, b"x")),
    ):
        try:
            await call()
        except NoPermissionError:
            refused.append(what)
    await s.close()
    return refused


async def sampler_shares_weights(cluster: Cluster) -> tuple[bool, bool, bool, list[str]]:
    """What the sampler's credentials must allow to share versions with its machine's samplers:
    take, renew and give back a fetch lease, and advertise a copy."""
    s = streams_as(cluster, "sampler")
    taken = await s.claim_weight_fetch("node", 1, "a", 5.0)
    renewed = await s.renew_weight_fetch("node", 1, "a", 5.0)
    await s.release_weight_fetch("node", 1, "a")
    await asyncio.sleep(0.05)
    again = await s.claim_weight_fetch("node", 1, "b", 5.0)
    await s.advertise_weights("acl-check", 1, "", machine="node", directory="/copy")
    copies = await s.weight_copies(1, "node")
    await s.withdraw_weights("acl-check")
    await s.close()
    return taken, renewed, again, copies


@pytest.mark.timeout(1200)
def test_pipeline_survives_poison_and_kills_and_loses_nothing(
    tmp_path: Path, toy_model: Path
) -> None:
    cluster = Cluster(tmp_path / "run", toy_model, dict(SETTINGS))
    cluster.start(samplers=2)
    try:
        # a prompt lost before any sampler saw it (as an XADD lost in a Redis crash would be):
        # the ledger admits it again once it is overdue
        lost = asyncio.run(lose_first_prompt(cluster))
        wait_for("the first steps", lambda: cluster.step() >= 2, cluster, timeout=400)
        # poison on both streams: dead-lettered with its reason, nobody dies
        expected = asyncio.run(inject_poison(cluster))
        wait_for(
            "dead letters",
            lambda: len(asyncio.run(dead_letters(cluster))) >= len(expected),
            cluster,
            timeout=60,
        )
        got = asyncio.run(dead_letters(cluster))
        for entry_id, reason in expected.items():
            assert got[entry_id].split(":", 1)[0] == reason, (entry_id, got[entry_id])
        assert all(cluster.running(n) for n in ("sampler-0", "sampler-1", "learner"))
        # a sampler killed mid-work, replaced; its engine processes do not outlive it
        engine_procs = psutil.Process(cluster.procs["sampler-0"].pid).children(recursive=True)
        assert engine_procs  # the reaper (and the engine's model workers, where it has any)
        cluster.restart("sampler-0")
        _, alive = psutil.wait_procs(engine_procs, timeout=15)
        assert alive == [], alive
        step = cluster.step()
        wait_for("steps after a sampler kill", lambda: cluster.step() >= step + 2, cluster)
        # the learner killed, restarted on the same work dir
        cluster.restart("learner")
        step = cluster.step()
        wait_for("steps after a learner kill", lambda: cluster.step() >= step + 2, cluster)
        # redis-server killed (AOF everysec: up to a second of entries may vanish)
        cluster.restart("redis")
        step = cluster.step()
        wait_for("steps after a redis kill", lambda: cluster.step() >= step + 2, cluster)
        # Redis down: SIGTERM still stops the learner and a sampler within 5 s
        cluster.send("redis", signal.SIGKILL)
        time.sleep(1.0)
        for name in ("learner", "sampler-1"):
            assert cluster.send(name, signal.SIGTERM) < 5.0, cluster.log_tail(name)
            assert cluster.procs[name].returncode == 0, cluster.log_tail(name)
        cluster.start_redis()
        cluster.start_learner()
        cluster.start_sampler("sampler-1")
        total = int(SETTINGS["TREEPO_LEARNER__TOTAL_STEPS"])
        deadline = time.monotonic() + 600
        while cluster.running("learner") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cluster.procs["learner"].returncode == 0, cluster.log_tail("learner")
        assert cluster.step() == total
        assert all(cluster.running(n) for n in ("sampler-0", "sampler-1"))
        assert sorted(asyncio.run(acl_denials(cluster))) == sorted(
            ["FLUSHALL", "XADD prompts", "DEL trees", "SET weights"]
        )
        assert asyncio.run(sampler_shares_weights(cluster)) == (True, True, True, ["/copy"])
    finally:
        cluster.stop()
    # the replacement sampler, started beside a busy one, became ready and took work
    summary = json.loads((cluster.root / "samplers" / "sampler-0" / "summary.json").read_text())
    assert summary["treepo_sampler_trees_total"] > 0
    result = audit(cluster.work)
    assert result.lost == [] and result.trained_twice == [], result
    assert result.trained == 3 * total
    assert result.admitted == result.trained + result.no_signal + result.abandoned + (
        result.outstanding
    )
    ledger = Ledger.from_json(cluster.state()["ledger"])  # type: ignore[index]
    assert ledger.finished[lost] == "trained" and ledger.readmitted_lost >= 1
