"""The learner on DeepSpeed (CPU accelerator): a real run with a real vLLM sampler in which the
learner trains, publishes, is killed and resumes (several ranks: tests/test_ranks.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import (
    RedisSettings,
    RunSettings,
    SamplerOptions,
    SamplerSettings,
    StreamSettings,
    TreeConfig,
)
from pipeline.wire.messages import TreeRollout, decode
from tests.helpers import make_streams, run_restoring
from tests.services import PrometheusServer, RedisServer, free_port
from workers.engine import VLLMPathGenerator
from workers.sampler import Sampler

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_a_stale_extension_lock_does_not_block_the_learner_start(tmp_path: Path) -> None:
    """A learner SIGKILLed while torch's JIT-extension lock is held leaves the lock file behind;
    the next learner must still start (DeepSpeed's CPU backend would wait on it forever)."""
    ext = tmp_path / "torch_extensions"
    for sub in ("deepspeed_shm_comm", "py311_cpu/deepspeed_shm_comm"):
        (ext / sub).mkdir(parents=True)
        (ext / sub / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "MASTER_PORT": str(free_port())}
    code = "from learner.trainer import init_distributed; init_distributed(); print('up')"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("up"), proc.stderr[-2000:]


def learner_env(
    server: RedisServer, model: Path, work: Path, port: int, total_steps: int
) -> dict[str, str]:
    return {
        **os.environ,
        "TREEPO_REDIS__URL": server.url,
        "TREEPO_RUN__NAME": "test",
        "TREEPO_RUN__MAX_STALENESS": "1",
        "TREEPO_LEARNER__MODEL": str(model),
        "TREEPO_LEARNER__WORK_DIR": str(work),
        "TREEPO_LEARNER__BATCH_PROMPTS": "3",
        "TREEPO_LEARNER__TOTAL_STEPS": str(total_steps),
        "TREEPO_LEARNER__LR": "1e-4",
        "TREEPO_LEARNER__DYNAMIC_SAMPLING": "false",
        "TREEPO_STREAMS__BLOCK_MS": "200",
        "TREEPO_LEARNER__PORT": str(port),
    }


def small_sampler(
    server: RedisServer,
    tmp: Path,
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
) -> Sampler:
    """An in-process sampler on the session's engine: small trees, 3 trees in flight, a fast
    weight poll (the learner tests' sampler)."""
    return Sampler(
        SamplerSettings(
            redis=RedisSettings(url=server.url),
            run=RunSettings(name="test", max_staleness=1),
            streams=StreamSettings(block_ms=200, claim_idle_ms=2000),
            tree=TreeConfig(width=4, segment_tokens=6, max_depth=6),
            sampler=SamplerOptions(
                port=0,
                work_dir=str(tmp / "sw"),
                trees_in_flight=3,
                allow_short_segments=True,
                weights_poll_s=0.1,
            ),
        ),
        engine,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )


def start_learner(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "learner.process"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def checkpoint_state(work: Path) -> dict | None:  # type: ignore[type-arg]
    pointer = work / "checkpoints" / "LATEST"
    if not pointer.is_file():
        return None
    state = work / "checkpoints" / pointer.read_text().strip() / "state.json"
    return json.loads(state.read_text()) if state.is_file() else None


async def check_observability(learner_port: int, sampler_port: int, tmp: Path) -> None:
    """A real Prometheus scrapes the running learner and sampler: every dashboard expression
    evaluates without error, the core panels have data, and promtool accepts both outputs."""
    import aiohttp

    from tests.helpers import dashboard_exprs

    targets = [f"127.0.0.1:{learner_port}", f"127.0.0.1:{sampler_port}"]
    prom = PrometheusServer(tmp / "prometheus", free_port(), targets).start()
    try:
        async with aiohttp.ClientSession() as http:
            for target in targets:
                async with http.get(f"http://{target}/metrics") as resp:
                    text = await resp.read()
                check = subprocess.run(
                    ["promtool", "check", "metrics"], input=text, capture_output=True
                )
                assert check.returncode == 0, check.stdout + check.stderr
            deadline = time.monotonic() + 60
            missing: list[str] = []
            while time.monotonic() < deadline:
                missing = []
                for title, expr, core in dashboard_exprs(run="test"):  # the run label works
                    async with http.get(f"{prom.url}/api/v1/query", params={"query": expr}) as resp:
                        body = await resp.json()
                    assert body["status"] == "success", (title, body)
                    if core and not body["data"]["result"]:
                        missing.append(title)
                if not missing:
                    break
                await asyncio.sleep(1)
            assert not missing, f"core panels without data: {missing}"
            # every swap was proven: the engine's canary log-probs match the learner's (fp32 here)
            query = {"query": 'max(treepo_sampler_canary_mismatch{run="test"})'}
            async with http.get(f"{prom.url}/api/v1/query", params=query) as resp:
                value = float((await resp.json())["data"]["result"][0]["value"][1])
            assert 0 <= value < 1e-3, value
    finally:
        prom.stop()


async def check_status(server: RedisServer, urls: list[str]) -> None:
    """``treepo status`` sees the live sampler, the streams and the rates."""
    from pipeline.cli.status import render, snapshot

    s = make_streams(server)
    try:
        snap = await snapshot(s, urls, interval=1.0)
    finally:
        await s.close()
    assert len([h for h in snap.samplers if h.state == "running"]) == 1
    assert snap.weights_version is not None and snap.weights_version >= 1
    assert snap.streams["trees"]["length"] > 0
    assert snap.metrics["treepo_sampler_trees_total"] > 0
    text = render(snap)
    assert "samplers alive: 1" in text and "savings:" in text
    assert "trees dropped: no signal" in text


@pytest.mark.timeout(900)
def test_learner_trains_publishes_survives_a_kill(
    redis_server: RedisServer,
    tmp_path: Path,
    toy_model: Path,
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    work = tmp_path / "learner"
    log = tmp_path / "learner.log"
    engine.stopping = False
    start_version = engine.policy_version
    sampler = small_sampler(redis_server, tmp_path, engine, tokenizer)

    async def main() -> tuple[dict, dict, dict]:  # type: ignore[type-arg]
        sampling = asyncio.create_task(sampler.run())
        port = free_port()
        env = learner_env(redis_server, toy_model, work, port, 50)
        env.update(
            TREEPO_LEARNER__EVAL_EVERY="2",
            TREEPO_LEARNER__EVAL_SIZE="8",
            TREEPO_LEARNER__EVAL_MAX_TOKENS="32",
            TREEPO_LEARNER__TENSORBOARD_DIR=str(tmp_path / "tb"),
        )
        proc = start_learner(env, log)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                state = checkpoint_state(work)
                if state and state["step"] >= 3 and engine.policy_version > start_version:
                    break
                assert proc.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("learner made no progress:\n" + log.read_text()[-3000:])
            await check_observability(port, sampler.port, tmp_path)
            await check_status(
                redis_server, [f"http://127.0.0.1:{p}/metrics" for p in (port, sampler.port)]
            )
            proc.send_signal(signal.SIGKILL)  # a crash, right after some checkpoint
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        at_kill = checkpoint_state(work)
        assert at_kill is not None
        total = at_kill["step"] + 3
        proc = start_learner(learner_env(redis_server, toy_model, work, free_port(), total), log)
        while proc.poll() is None:
            await asyncio.sleep(0.2)
        assert proc.returncode == 0, log.read_text()[-3000:]
        final = checkpoint_state(work)
        sampler.request_stop()
        await sampling
        s = make_streams(redis_server)
        trees = [decode(f[b"m"]) for _, f in await s.client.xrange(s.keys.trees)]
        await s.close()
        return at_kill, final, {"trees": trees}  # type: ignore[return-value]

    at_kill, final, seen = run_restoring(engine, tmp_path, start_version, main())
    # resumed and finished: step and version continue from the checkpoint
    assert final["step"] == at_kill["step"] + 3 and final["version"] == final["step"]
    # nothing lost: every tree trained before the crash is still recorded as trained
    assert set(at_kill["trained"]) <= set(final["trained"])
    # nothing trained twice: every step trained 3 distinct trees, and no id repeats across steps
    assert len(final["trained"]) == 3 * final["step"]
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps][-3:] == [final["step"] - 2, final["step"] - 1, final["step"]]
    # the unfiltered view of sampled leaves: a fraction of leaves, present from the first step
    assert steps[0]["sampled_accuracy"] is not None
    assert all(0 <= r["sampled_accuracy"] <= 1 for r in steps if r["sampled_accuracy"] is not None)
    # every field of the step log is documented
    ops_doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    assert not [k for k in steps[0] if f"`{k}`" not in ops_doc]
    # periodic held-out evaluation: in its own log, in the step log, as TensorBoard scalars
    evals = [json.loads(line) for line in (work / "evals.jsonl").read_text().splitlines()]
    assert evals and all(e["problems"] == 8 and 0 <= e["accuracy"] <= 1 for e in evals)
    assert all(e["step"] % 2 == 0 for e in evals)
    later = [r for r in steps if r["step"] > evals[0]["step"]]
    assert later and later[0]["eval_accuracy"] is not None and later[0]["eval_step"] >= 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    assert {"reward", "loss", "is_weight_mean"} <= set(board.Tags()["scalars"])
    assert len(board.Scalars("reward")) >= 3
    # the sampler picked up published weights: later trees carry newer policy versions
    trees: list[TreeRollout] = seen["trees"]  # type: ignore[assignment]
    versions = {n.policy_version for t in trees for n in t.nodes}
    assert max(versions) >= 2, versions
    assert "resumed from" in log.read_text()


def test_no_trained_tree_is_older_than_the_bound(
    redis_server: RedisServer, toy_model: Path, tmp_path: Path
) -> None:
    """Trees of staleness 0..3 against max_staleness 1: the learner keeps only 0 and 1 on
    arrival, drops (and admits again) the rest, and drops a kept tree that crossed the bound
    while it waited for a batch."""
    from transformers import AutoTokenizer

    from learner.process import Learner
    from learner.rules import staleness
    from learner.trainer import build_engine
    from pipeline.config import LearnerOptions, LearnerSettings
    from pipeline.treepo.tasks import ArithTask
    from pipeline.wire.messages import RolloutLeaf, RolloutNode
    from pipeline.wire.streams import Delivery

    opts = LearnerOptions(model=str(toy_model), work_dir=str(tmp_path / "work"), batch_prompts=8)
    settings = LearnerSettings(
        redis=RedisSettings(url=redis_server.url),
        run=RunSettings(name="test", max_staleness=1),
        learner=opts,
    )
    learner = Learner(
        settings,
        build_engine(toy_model, opts),
        AutoTokenizer.from_pretrained(str(toy_model)),
        ArithTask().problems("train", 50, seed=0),
    )
    learner.state.step = 5

    def tree(pos: int, versions: list[int]) -> Delivery:
        first, later = versions
        nodes = [RolloutNode(p, [5, 6], [-0.1, -0.2], v) for p, v in ((-1, first), (0, later))]
        nodes.append(RolloutNode(0, [7], [-0.3], later))
        leaves = [RolloutLeaf(1, 1.0, "eos"), RolloutLeaf(2, -1.0, "eos")]
        t = TreeRollout(
            [1, 2], nodes, leaves, tree_id=f"t-q{pos}", prompt_id=f"q{pos}", sampler_id="s"
        )
        return Delivery("trees", f"{pos}-0", t, b"")

    async def main() -> None:
        for pos in range(4):
            learner.state.ledger.admit(f"q{pos}", pos, f"{pos}-9", time.time())
        learner.state.cursor = 4
        # staleness = version 5 - the oldest segment's version: 0, 1, 2, 3
        intake, state, since = learner.intake, learner.state, learner.since_step
        await intake.take(
            [tree(0, [5, 5]), tree(1, [4, 5]), tree(2, [3, 5]), tree(3, [2, 2])], state, since
        )
        assert [t.prompt_id for _, t in intake.ready] == ["q0", "q1"]
        assert learner.state.dropped_stale == 2
        assert learner.state.ledger.outstanding["q2"].attempts == 2  # admitted again
        learner.state.step = 6  # a step went by while they waited
        await intake.drop_now_stale(state, since)
        assert [t.prompt_id for _, t in intake.ready] == ["q0"]
        assert all(staleness(t, learner.version) <= 1 for _, t in intake.ready)
        assert learner.state.ledger.readmitted_stale == 3
        await learner.streams.close()

    asyncio.run(main())


@pytest.mark.slow
def test_weights_are_published_in_the_base_models_dtypes(
    toy_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A bf16 base model trained in fp32 (the CPU default) publishes bf16 weights that the
    samplers' check accepts, holding the trained values (rounded to bf16), without a progress
    bar (one per version is noise in the learner's log) and leaving transformers' setting as
    it was."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from learner.batch import build_batch
    from learner.trainer import build_engine, export_weights, full_state_dict, train_on_batch
    from pipeline.config import LearnerOptions, LossSettings
    from pipeline.weights.manifest import check_compatible, tensor_specs
    from tests.test_packing import random_tree

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(toy_model), dtype=torch.bfloat16).save_pretrained(
        str(base)
    )
    for f in toy_model.iterdir():
        if not f.name.endswith(".safetensors") and not (base / f.name).exists():
            shutil.copy(f, base / f.name)
    assert {d for d, _ in tensor_specs(base).values()} == {"BF16"}
    opts = LearnerOptions(model=str(base), lr=1e-2)
    engine = build_engine(base, opts)
    assert next(engine.module.parameters()).dtype == torch.float32  # auto: fp32 on CPU
    import random

    rng = random.Random(0)
    trees = [random_tree(rng, empty_nodes=False) for _ in range(3)]
    for t in trees:
        t.prompt_token_ids = t.prompt_token_ids % 32
        for node in t.nodes:
            node.token_ids = node.token_ids % 32
    train_on_batch(engine, build_batch(trees), opts, LossSettings(), step=0)
    out = tmp_path / "published"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    export_weights(engine, out)
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == bars
    check_compatible(tensor_specs(out), tensor_specs(base))  # raises on a dtype mismatch
    published, trained = load_file(str(next(out.glob("*.safetensors")))), full_state_dict(engine)
    for name, value in published.items():
        assert torch.equal(value, trained[name].to(torch.bfloat16)), name
