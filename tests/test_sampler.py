"""The sampler worker on a real vLLM CPU engine and a real redis-server."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from pydantic import SecretStr

from pipeline.config import (
    RedisSettings,
    RunSettings,
    SamplerOptions,
    SamplerSettings,
    StreamSettings,
    TreeConfig,
)
from pipeline.httpserver import start
from pipeline.treepo.tasks import ArithTask
from pipeline.weights.server import WeightStore, add_routes, announce
from pipeline.wire.messages import PromptTask, TreeRollout
from pipeline.wire.streams import Streams
from tests.helpers import make_streams, run_restoring
from tests.services import RedisServer, free_port, wait_port
from tests.test_sampling import expected_independent
from workers.engine import VLLMPathGenerator
from workers.sampler import Sampler

pytestmark = pytest.mark.slow

TREE = TreeConfig(width=4, segment_tokens=6, max_depth=6, branching=2, initial_divergence=2)
ANSWER_FORMAT = re.compile(r"^(\d+\+\d+=\d+;)*\\boxed\{\d+\}$")
FORMAT_SEEN: list[bool] = []


def settings_for(server: RedisServer, tmp: Path, **sampler: object) -> SamplerSettings:
    return SamplerSettings(
        redis=RedisSettings(url=server.url),
        run=RunSettings(name="test", max_staleness=1),
        streams=StreamSettings(block_ms=100, claim_idle_ms=1000),
        tree=TREE,
        sampler=SamplerOptions(
            port=0,
            work_dir=str(tmp / "work"),
            weights_poll_s=0.1,
            allow_short_segments=True,
            **sampler,
        ),  # type: ignore[arg-type]
    )


def make_sampler(
    server: RedisServer,
    tmp: Path,
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
    token: str | None = None,
    **sampler: object,
) -> Sampler:
    engine.stopping = False
    settings = settings_for(server, tmp, **sampler)
    settings.weights.token = SecretStr(token) if token else None
    return Sampler(
        settings,
        engine,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )


def tasks(tokenizer, n: int, start: int = 0) -> list[PromptTask]:  # type: ignore[no-untyped-def]
    problems = ArithTask().problems("heldout", n + start, seed=3)[start:]
    return [
        PromptTask(
            f"p{start + i}",
            tokenizer(p.prompt)["input_ids"],
            p.answer,
            start + i,
            0,
            "arith",
            time.time(),
        )
        for i, p in enumerate(problems)
    ]


async def push(s: Streams, prompts: list[PromptTask]) -> None:
    for p in prompts:
        await s.publish(s.keys.prompts, p)


async def read_trees(s: Streams, n: int, timeout: float = 120) -> list[TreeRollout]:
    await s.ensure_group(s.keys.trees, "learner")
    out: list[TreeRollout] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        got = await s.read(s.keys.trees, "learner", "test-reader", count=n)
        out.extend(d.message for d in got)  # type: ignore[misc]
        await s.ack(s.keys.trees, "learner", [d.entry_id for d in got])
    return out


def check_rollout(r: TreeRollout, task: PromptTask, decode, eos: int) -> None:  # type: ignore[no-untyped-def]
    assert r.prompt_token_ids.tolist() == task.prompt_token_ids
    assert r.tree_id == f"t-{task.prompt_id}"
    assert len(r.leaves) == TREE.width  # fallback on: exactly w leaves
    parents = {n.parent for n in r.nodes}
    for i, n in enumerate(r.nodes):
        if i in parents:
            assert len(n.token_ids) == TREE.segment_tokens and eos not in n.token_ids.tolist()
        assert np.isfinite(n.logprobs).all() and (n.logprobs <= 1e-6).all()
    for leaf in r.leaves:
        text = decode(leaf_tokens(r, leaf))
        assert set(text.replace("\\boxed{", "")) <= set("0123456789+=;}"), text
        tail = text.rsplit("\\boxed{", 1)[1] if "\\boxed{" in text else ""
        expected = 1.0 if "}" in tail and tail.split("}")[0] == task.answer else -1.0
        assert leaf.reward == expected, (text, task.answer)
        if leaf.finish_reason == "eos":
            FORMAT_SEEN.append(bool(ANSWER_FORMAT.match(text)))
    assert r.stats.decoded_tokens == sum(len(n.token_ids) for n in r.nodes)
    assert abs(r.stats.independent_tokens - expected_independent(r)) <= 1
    assert r.stats.engine_calls == len(r.leaves)  # one engine request per path


def test_prompt_in_tree_out(
    redis_server: RedisServer, tmp_path: Path, engine: VLLMPathGenerator, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        s = make_streams(redis_server)
        prompts = tasks(tokenizer, 3)
        await push(s, prompts)
        sampler = make_sampler(redis_server, tmp_path, engine, tokenizer)
        assert await sampler.run(max_prompts=3) == 3
        trees = await read_trees(s, 3)
        assert sorted(t.prompt_id for t in trees) == ["p0", "p1", "p2"]
        by_id = {p.prompt_id: p for p in prompts}
        for r in trees:
            check_rollout(
                r,
                by_id[r.prompt_id],
                lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                engine.eos_token_id,
            )
            assert {n.policy_version for n in r.nodes} == {engine.policy_version}
        # sampled at temperature 1 from a briefly warmed-up model: most finished leaves follow
        # the task's format "a+b=c;c+d=e;\\boxed{e}"
        assert sum(FORMAT_SEEN) >= 0.5 * len(FORMAT_SEEN) > 0
        assert (await s.group_info(s.keys.prompts, "samplers")).pending == 0
        # metrics after the run: declared names with plausible values
        text = generate_latest(sampler.metrics.registry).decode()
        values = parse_metrics(text)
        assert values["treepo_sampler_trees_total"] == 3
        assert values["treepo_sampler_leaves_total"] == 3 * TREE.width
        assert (
            0
            < values["treepo_sampler_tokens_decoded_total"]
            < values["treepo_sampler_tokens_independent_total"]
        )
        assert values["treepo_sampler_tokens_decoded_total"] == sum(
            r.stats.decoded_tokens for r in trees
        )
        assert values["treepo_sampler_engine_requests_total"] == 3 * TREE.width
        assert values["treepo_sampler_engine_steps_total"] >= TREE.max_depth
        # every path's request got its first token, no sooner than the step after it was sent
        assert values["treepo_sampler_request_start_steps_count"] == 3 * TREE.width
        assert (
            values["treepo_sampler_request_start_steps_sum"]
            >= values["treepo_sampler_request_start_steps_count"]
        )
        assert values["treepo_sampler_generation_seconds_total"] > 0
        assert values["treepo_sampler_time_to_publish_seconds_count"] == 3
        assert values["treepo_sampler_gpu_seconds_used_total"] > 0
        assert values["treepo_sampler_gpu_seconds_independent_total"] > 0
        assert values["treepo_sampler_prompt_wait_seconds_count"] == 3
        await s.close()

    asyncio.run(main())


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def test_weight_swap_changes_outputs_and_corrupt_weights_are_refused(
    redis_server: RedisServer,
    tmp_path: Path,
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    from safetensors.torch import load_file, save_file

    base = load_file(str(Path(engine.options.model) / "model.safetensors"))
    start_version = engine.policy_version

    async def main() -> None:
        s = make_streams(redis_server)
        store = WeightStore(tmp_path / "weights", keep=5)
        app = web.Application()
        add_routes(app, store, token="sekret")
        runner, port = await start(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        sampler = make_sampler(redis_server, tmp_path, engine, tokenizer, token="sekret")
        v1 = start_version + 1

        def write_scrambled(d: Path) -> None:  # a different policy: permuted embedding rows
            w = dict(base)
            emb = next(k for k in w if "embed_tokens" in k)
            w[emb] = w[emb].flip(0).contiguous()
            save_file(w, str(d / "model.safetensors"))

        manifest, data = store.publish(v1, write_scrambled)
        await announce(s, v1, url, data, manifest.total_bytes, token="sekret")
        prompts = tasks(tokenizer, 2)
        await push(s, prompts)
        # the sampler takes the announced weights before its first prompt
        assert await sampler.run(max_prompts=2) == 2
        trees = await read_trees(s, 2)
        assert all(n.policy_version == v1 for r in trees for n in r.nodes)
        assert engine.policy_version == v1
        # same prompt under new weights no longer follows the trained format
        texts = [
            tokenizer.decode(leaf_tokens(r, leaf), skip_special_tokens=True)
            for r in trees
            for leaf in r.leaves
        ]
        assert not all(ANSWER_FORMAT.match(t) for t in texts)

        sampler = make_sampler(
            redis_server, tmp_path, engine, tokenizer, token="sekret", unhealthy_after_s=0.2
        )
        # a forged announcement (no valid signature) of a far newer version, pointing elsewhere:
        # refused before any request, so the token never leaves; the sampler's view is unchanged
        trap_hits: list[str] = []
        trap = web.Application()

        async def record(request: web.Request) -> web.Response:
            trap_hits.append(request.headers.get("Authorization", ""))
            return web.Response(status=404)

        trap.router.add_get("/{tail:.*}", record)
        trap_runner, trap_port = await start(trap, "127.0.0.1", 0)
        forged = f"http://127.0.0.1:{trap_port}"
        await announce(s, v1 + 100, forged, data, manifest.total_bytes, token="wrong")
        await sampler.follower.poll()
        await announce(s, v1 + 101, forged, data, manifest.total_bytes)  # unsigned
        await sampler.follower.poll()
        assert trap_hits == []
        assert sampler.follower.announced == v1 and sampler.health()["ok"]
        assert sampler.metrics.weight_failures.labels("announcement")._value.get() == 2
        await trap_runner.cleanup()
        # v2: the file is corrupted after the manifest was written -> sha256 mismatch, refused
        v2 = v1 + 1
        manifest, data = store.publish(
            v2, lambda d: save_file(dict(base), str(d / "model.safetensors"))
        )
        with (store.path(v2) / "model.safetensors").open("r+b") as f:
            f.seek(200)
            f.write(b"\x00\xff" * 8)
        await announce(s, v2, url, data, manifest.total_bytes, token="sekret")
        await sampler.follower.poll()
        assert sampler.metrics.weight_rejected._value.get() == 1
        await sampler.follower.poll()  # within the backoff: not fetched again
        assert sampler.metrics.weight_rejected._value.get() == 1
        # v3: a tensor missing -> refused by the header check before the engine sees it
        v3 = v2 + 1
        manifest, data = store.publish(
            v3, lambda d: save_file(dict(list(base.items())[1:]), str(d / "model.safetensors"))
        )
        await announce(s, v3, url, data, manifest.total_bytes, token="sekret")
        await sampler.follower.poll()
        assert sampler.metrics.weight_rejected._value.get() == 2
        # two versions ahead of the engine (bound 1) for longer than unhealthy_after_s: not ok
        assert sampler.health()["ok"]  # the clock starts now
        await asyncio.sleep(0.3)
        health = sampler.health()
        assert not health["ok"] and f"v{v3}" in health["problem"], health
        assert "verification" in health["problem"]
        # sampling goes on with the newest verified weights: the failures do not stall it
        await push(s, tasks(tokenizer, 2, start=10))
        assert await sampler.run(max_prompts=2) == 2
        trees = await read_trees(s, 2)
        assert all(n.policy_version == v1 for r in trees for n in r.nodes), "kept the old weights"
        assert engine.policy_version == v1
        # a wrong token is refused by the server
        import aiohttp

        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/weights/{v1}/manifest.json") as resp,
        ):
            assert resp.status == 401
        await runner.cleanup()
        await s.close()

    run_restoring(engine, tmp_path, start_version, main())


def test_a_sampler_catching_up_on_weights_claims_no_prompt(
    redis_server: RedisServer,
    tmp_path: Path,
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    """While a version more than ``max_staleness`` ahead is downloading (slowly here), prompts
    wait: every tree after the announcement is sampled on the new version, none on the old one
    that the learner would drop as stale. And trees that grow for longer than ``claim_idle_ms``
    (1 s here) keep their prompts: none is reclaimed and grown twice."""
    from safetensors.torch import load_file, save_file

    base = load_file(str(Path(engine.options.model) / "model.safetensors"))
    start_version = engine.policy_version
    delay_s = 1.0

    @web.middleware
    async def slow(request: web.Request, handler):  # type: ignore[no-untyped-def]
        await asyncio.sleep(delay_s)
        return await handler(request)

    async def main() -> None:
        s = make_streams(redis_server)
        store = WeightStore(tmp_path / "weights", keep=5)
        app = web.Application(middlewares=[slow])
        add_routes(app, store)
        runner, port = await start(app, "127.0.0.1", 0)
        sampler = make_sampler(redis_server, tmp_path, engine, tokenizer)
        assert sampler.settings.streams.claim_idle_ms == 1000
        running = asyncio.create_task(sampler.run(max_prompts=4))
        await push(s, tasks(tokenizer, 2))
        first = await read_trees(s, 2)
        assert sorted(r.tree_id for r in first) == ["t-p0", "t-p1"]
        assert all(n.policy_version == start_version for r in first for n in r.nodes)
        ahead = start_version + 2  # beyond max_staleness 1: a tree on the old weights is stale
        manifest, data = store.publish(
            ahead, lambda d: save_file(dict(base), str(d / "model.safetensors"))
        )
        await announce(s, ahead, f"http://127.0.0.1:{port}", data, manifest.total_bytes)
        deadline = time.monotonic() + 10
        while sampler.follower.current != ahead and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the announcement reached the follower; its fetch began
        assert engine.policy_version == start_version, "fetched before the prompts came"
        await push(s, tasks(tokenizer, 2, start=2))
        later = await read_trees(s, 2)
        assert await running == 4
        assert sorted(r.tree_id for r in later) == ["t-p2", "t-p3"]
        assert [sorted({n.policy_version for n in r.nodes}) for r in later] == [[ahead]] * 2
        assert sampler.metrics.held_off_seconds._value.get() >= 0.5 * delay_s
        assert await read_trees(s, 1, timeout=1) == []
        assert sampler.streams.counters.reclaimed == 0
        await runner.cleanup()
        await s.close()

    run_restoring(engine, tmp_path, start_version, main())


def test_samplers_sharing_a_machine_take_one_download(
    redis_server: RedisServer,
    tmp_path: Path,
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    """Two samplers of one machine see a version at once (the learner treated as remote): one
    downloads it, the other links that verified copy; the learner sends it once and both
    samplers' metrics say how they took it."""
    from pipeline.weights.server import ServeCounters

    start_version = engine.policy_version

    async def main() -> tuple[list[Sampler], int, int]:
        s = make_streams(redis_server)
        store = WeightStore(tmp_path / "weights", keep=5)
        counters = ServeCounters()
        app = web.Application()
        add_routes(app, store, counters=counters)
        runner, port = await start(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        samplers = []
        for worker in ("a", "b"):
            settings = settings_for(redis_server, tmp_path, worker_id=worker)
            settings.weights.link_same_machine = False
            samplers.append(Sampler(settings, engine, lambda ids: tokenizer.decode(ids)))
        v = start_version + 1
        model = Path(engine.options.model) / "model.safetensors"
        manifest, data = store.publish(v, lambda d: shutil.copy(model, d / "model.safetensors"))
        await announce(s, v, url, data, manifest.total_bytes)
        await asyncio.gather(*(x.follower.poll() for x in samplers))
        for x in samplers:
            await x.streams.close()
        await runner.cleanup()
        await s.close()
        return samplers, counters.bytes_sent, manifest.total_bytes

    samplers, sent, size = run_restoring(engine, tmp_path, start_version, main())
    fetches = [x.follower.last_fetch for x in samplers]
    assert all(f is not None for f in fetches)
    assert sorted(f.method for f in fetches) == ["full", "host"]  # type: ignore[union-attr]
    assert sent == size  # the learner sent the version once
    inodes = {
        (x.work_dir / f"v{start_version + 1}" / "model.safetensors").stat().st_ino for x in samplers
    }
    assert len(inodes) == 1
    taken = [x.metrics.weight_fetches.labels("host")._value.get() for x in samplers]
    assert sorted(taken) == [0, 1]


def leaf_tokens(r: TreeRollout, leaf) -> list[int]:  # type: ignore[no-untyped-def]
    return [t for n in r.path(leaf.node) for t in r.nodes[n].token_ids.tolist()]


@pytest.mark.timeout(900)
def test_two_sampler_processes_split_work_and_stop_on_sigterm(
    redis_server: RedisServer,
    tmp_path: Path,
    toy_model: Path,
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    """Two real ``treepo-sampler`` processes on one stream: every prompt is served exactly once,
    both expose /metrics and /healthz, and SIGTERM ends each within 5 s."""
    ports = [free_port(), free_port()]
    env = {
        **os.environ,
        "TREEPO_REDIS__URL": redis_server.url,
        "TREEPO_RUN__NAME": "test",
        "TREEPO_SAMPLER__MODEL": str(toy_model),
        "TREEPO_SAMPLER__TREES_IN_FLIGHT": "4",
        "TREEPO_SAMPLER__ALLOW_SHORT_SEGMENTS": "true",
        "TREEPO_TREE__WIDTH": "4",
        "TREEPO_TREE__SEGMENT_TOKENS": "6",
        "TREEPO_TREE__MAX_DEPTH": "6",
        "TREEPO_SAMPLER__WORK_DIR": str(tmp_path / "work"),
        "TREEPO_STREAMS__BLOCK_MS": "200",
    }
    logs = [(tmp_path / f"s{i}.log").open("wb") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "workers.sampler", "--port", str(p)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        for p, log in zip(ports, logs)
    ]
    try:
        for p in ports:  # both engines up (their HTTP servers start last) before any prompt
            wait_port(p, timeout=300)

        async def main() -> list[TreeRollout]:
            s = make_streams(redis_server)
            await push(s, tasks(tokenizer, 24))
            trees = await read_trees(s, 24, timeout=240)
            await s.close()
            return trees

        trees = asyncio.run(main())
        ids = [t.prompt_id for t in trees]
        assert sorted(ids) == sorted(f"p{i}" for i in range(24)) and len(set(ids)) == 24
        assert len({t.sampler_id for t in trees}) == 2, "both samplers took work"
        import urllib.request

        for p in ports:
            wait_port(p)
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode()
            )
            assert "treepo_sampler_trees_total" in text
            health = urllib.request.urlopen(f"http://127.0.0.1:{p}/healthz", timeout=5).read()
            assert b'"ok": true' in health
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for proc in procs:
            assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5.0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_on_policy_importance_weights_are_one_at_any_temperature(
    redis_server: RedisServer,
    tmp_path: Path,
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
    temperature: float,
) -> None:
    """Trees sampled by the real engine at temperature T carry T; the learner's log-probs at T of
    the same weights match vLLM's to 1e-3 at every importance level, and plain log-softmax (T
    ignored) does not."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.batch import build_batch
    from learner.loss import behavior_log_weights
    from learner.trainer import token_logprobs
    from pipeline.wire.messages import decode, encode

    async def sample() -> list[TreeRollout]:
        s = make_streams(redis_server)
        await push(s, tasks(tokenizer, 3))
        sampler = make_sampler(redis_server, tmp_path, engine, tokenizer, temperature=temperature)
        assert await sampler.run(max_prompts=3) == 3
        trees = await read_trees(s, 3)
        await s.close()
        return trees

    engine.options.temperature = temperature
    try:
        trees = asyncio.run(sample())
    finally:
        engine.options.temperature = 1.0
    assert [decode(encode(t)).temperature for t in trees] == [temperature] * 3  # type: ignore[union-attr]
    model = AutoModelForCausalLM.from_pretrained(engine.options.model, dtype=torch.float32)
    batch = build_batch(trees, pad_id=0)
    with torch.no_grad():
        at_t = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.temperatures)
        plain = token_logprobs(model, batch.input_ids, batch.attention_mask)
    for level in ("token", "segment", "sequence"):
        for lp, close in ((at_t, True), (plain, False)):
            log_w = behavior_log_weights(
                lp, batch.behavior_logprobs, batch.mask, batch.segment_ids, level
            )
            err = (log_w.exp() - 1).abs()[batch.mask.bool()].max().item()
            assert (err < 1e-3) is close, (level, close, err)
