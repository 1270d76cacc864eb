"""The learner on several DeepSpeed ranks (real launcher, real gloo ranks on CPU): one update on
2 ranks equals the 1-rank update at ZeRO 0, 2 and 3; a checkpoint restores every rank's
optimizer partition exactly; a 2-rank learner process trains against a real vLLM sampler, loses
a rank to SIGKILL, exits non-zero in bounded time, and a restart finishes with every tree
trained exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from learner.checkpoint import check_layout
from learner.ranks import launcher_command
from pipeline.entry import LAUNCHER_ENV
from pipeline.errors import ConfigError
from tests.helpers import run_restoring
from tests.services import RedisServer, free_port
from tests.test_learner import checkpoint_state, learner_env, small_sampler
from workers.engine import VLLMPathGenerator

ROOT = Path(__file__).resolve().parent.parent


def launch(ranks: int, *args: str) -> None:
    """tests/ds_ranks.py under ``deepspeed --num_gpus <ranks>``."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher, "the deepspeed launcher is installed with the learner extra"
    command = launcher_command(launcher, ranks, free_port())
    proc = subprocess.run(
        [*command, str(ROOT / "tests" / "ds_ranks.py"), *args],
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_a_checkpoint_of_another_world_size_or_stage_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ranks.json").write_text(json.dumps({"world_size": 2, "zero_stage": 2}))
    check_layout(tmp_path, 2, 2)
    with pytest.raises(ConfigError, match=r"written by 2 learner rank\(s\); this learner has 4"):
        check_layout(tmp_path, 4, 2)
    with pytest.raises(ConfigError, match=r"ZeRO stage 2; this learner has .*ZERO_STAGE=3"):
        check_layout(tmp_path, 2, 3)
    (tmp_path / "ranks.json").unlink()  # written before there were ranks: one rank, ZeRO 0
    with pytest.raises(ConfigError, match=r"written by 1 learner rank\(s\); this learner has 2"):
        check_layout(tmp_path, 2, 0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_make_the_one_rank_update(toy_model: Path, tmp_path: Path) -> None:
    stages = (0, 2, 3)
    for ranks in (1, 2):
        launch(ranks, "update", str(toy_model), str(tmp_path), ",".join(map(str, stages)))
    for stage in stages:
        before = load_file(str(tmp_path / f"before-w1-s{stage}.safetensors"))
        one = load_file(str(tmp_path / f"after-w1-s{stage}.safetensors"))
        two = load_file(str(tmp_path / f"after-w2-s{stage}.safetensors"))
        assert one.keys() == two.keys()
        for name in one:
            assert not torch.equal(one[name], before[name]), name  # the update moved it
            rel = float((two[name] - one[name]).norm() / one[name].norm())
            assert rel <= 1e-5, (stage, name, rel)
        s1, s2 = (json.loads((tmp_path / f"stats-w{w}-s{stage}.json").read_text()) for w in (1, 2))
        # whole-batch statistics, not one rank's: gradient norm, loss, tokens
        assert abs(s1["grad_norm"] - s2["grad_norm"]) <= 1e-5 * s1["grad_norm"], (s1, s2)
        assert abs(s1["loss"] - s2["loss"]) <= 1e-5 * max(1e-3, abs(s1["loss"])), (s1, s2)
        assert s1["tokens"] == s2["tokens"] and s1["tokens_per_leaf"] == s2["tokens_per_leaf"]
        sums = {(tmp_path / f"checksum-w2-s{stage}-rank{r}.json").read_text() for r in (0, 1)}
        assert len(sums) == 1, sums  # both ranks hold the same weights
        # held-out evaluation on the training model: two ranks answer half each, the same
        # answers one rank gives (ZeRO-3: generating in step)
        one_rank = json.loads((tmp_path / f"answers-w1-s{stage}-rank0.json").read_text())
        halves = [
            json.loads((tmp_path / f"answers-w2-s{stage}-rank{r}.json").read_text()) for r in (0, 1)
        ]
        assert len(one_rank) == 8 and all(len(h) == 4 for h in halves), halves
        assert {**halves[0], **halves[1]} == one_rank
        # the exported weights (gathered under ZeRO-3) load in transformers as trained
        from transformers import AutoModelForCausalLM

        export = tmp_path / f"export-w2-s{stage}"
        shutil.copy(toy_model / "config.json", export / "config.json")
        loaded = AutoModelForCausalLM.from_pretrained(str(export)).state_dict()
        assert all(torch.equal(loaded[k], two[k]) for k in two)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_checkpoint_restores_every_ranks_optimizer_partition_exactly(
    toy_model: Path, tmp_path: Path
) -> None:
    stages = "2,3"
    launch(2, "save", str(toy_model), str(tmp_path), stages)
    launch(2, "resume", str(toy_model), str(tmp_path), stages)
    for stage in (2, 3):
        files = sorted((tmp_path / f"ckpt-w2-s{stage}").glob("step-*/optimizer-rank*"))
        assert len(files) == 4, files  # each rank saved its own partition
        for r in (0, 1):
            saved = load_file(str(tmp_path / f"optim-saved-w2-s{stage}-rank{r}.st"))
            resumed = load_file(str(tmp_path / f"optim-resumed-w2-s{stage}-rank{r}.st"))
            assert saved.keys() == resumed.keys() and any(k.endswith("exp_avg") for k in saved)
            assert all(torch.equal(saved[k], resumed[k]) for k in saved), (stage, r)
        # partitions: each rank holds half of the master weights (plus alignment padding)
        ckpt = next((tmp_path / f"ckpt-w2-s{stage}").glob("step-*"))
        params = sum(v.numel() for v in load_file(str(ckpt / "model.safetensors")).values())
        masters = [
            load_file(str(ckpt / f"optimizer-rank{r}.safetensors"))["master.0"].numel()
            for r in (0, 1)
        ]
        assert masters[0] == masters[1] and params <= 2 * masters[0] < params + 64, masters
        # the update after the restore is the update after the save, bit for bit
        a = load_file(str(tmp_path / f"second-saved-w2-s{stage}.st"))
        b = load_file(str(tmp_path / f"second-resumed-w2-s{stage}.st"))
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def learner_ranks(work_env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "learner.process", "--ranks", "2"],
            cwd=ROOT,
            env=work_env,
            stdout=err,
            stderr=err,
            start_new_session=True,
        )


def rank_pid(launcher: subprocess.Popen[bytes], rank: int) -> int:
    """The pid of the learner rank ``rank`` among the launcher's descendants."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "learner.process" in " ".join(child.cmdline()) and child.environ().get(
                "RANK"
            ) == str(rank):
                return int(child.pid)
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} under the launcher")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_two_rank_learner_survives_losing_a_rank(
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

    def env(total: int) -> dict[str, str]:
        e = learner_env(redis_server, toy_model, work, free_port(), total)
        e.update({"TREEPO_LEARNER__ZERO_STAGE": "2", "TREEPO_LEARNER__RANK_TIMEOUT_S": "60"})
        # an engine built earlier in this pytest process set MASTER_PORT and holds that port
        for name in LAUNCHER_ENV:
            e.pop(name, None)
        return e

    async def main() -> tuple[dict, dict, float]:  # type: ignore[type-arg]
        sampling = asyncio.create_task(sampler.run())
        proc = learner_ranks(env(50), log)
        try:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:
                state = checkpoint_state(work)
                if state and state["step"] >= 3 and engine.policy_version > start_version:
                    break
                assert proc.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("learner made no progress:\n" + log.read_text()[-3000:])
            os.kill(rank_pid(proc, 1), signal.SIGKILL)  # lose a rank mid-run
            killed = time.monotonic()
            while proc.poll() is None and time.monotonic() - killed < 90:
                await asyncio.sleep(0.2)
            exit_after = time.monotonic() - killed
            code = proc.poll()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        assert code not in (None, 0), (code, log.read_text()[-3000:])
        at_kill = checkpoint_state(work)
        assert at_kill is not None
        proc = learner_ranks(env(at_kill["step"] + 3), log)
        try:
            while proc.poll() is None:
                await asyncio.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, log.read_text()[-3000:]
        final = checkpoint_state(work)
        sampler.request_stop()
        await sampling
        return at_kill, final, exit_after  # type: ignore[return-value]

    at_kill, final, exit_after = run_restoring(engine, tmp_path, start_version, main())
    tail = log.read_text()[-3000:]
    assert exit_after < 60, (exit_after, tail)  # the launcher ends the job when a rank dies
    assert final["step"] == at_kill["step"] + 3, (at_kill["step"], final["step"], tail)
    assert set(at_kill["trained"]) <= set(final["trained"]), tail  # nothing lost
    assert len(final["trained"]) == 3 * final["step"], tail  # nothing trained twice
    layout = json.loads(
        (
            work / "checkpoints" / (work / "checkpoints" / "LATEST").read_text() / "ranks.json"
        ).read_text()
    )
    assert layout == {"world_size": 2, "zero_stage": 2}
    assert "resumed from" in log.read_text()
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, final["step"] + 1))
