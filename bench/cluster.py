"""A whole pipeline of real processes for fault tests and the soak run: redis-server started by
``ops/redis-server.sh`` (the shipped config, AOF ``everysec``, and the shipped ACL users), one
``treepo-learner`` and N ``treepo-sampler`` processes, each started, signalled and restarted by
pid. Used by ``tests/test_faults.py`` and ``bench/soak.py``; nothing in the product imports it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.checkpoints import latest_checkpoint
from pipeline.entry import child_env
from tests.services import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORDS = {"learner": "learner-pw", "sampler": "sampler-pw"}


@dataclass
class Cluster:
    """The processes of one run under ``root``. ``settings`` are ``TREEPO_*`` variables shared by
    every process; the learner and the samplers authenticate as their own ACL users."""

    root: Path
    model: Path
    settings: dict[str, str] = field(default_factory=dict)
    redis_port: int = field(default_factory=free_port)
    learner_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)
    restarts: int = 0

    @property
    def work(self) -> Path:
        return self.root / "learner"

    def env(self, role: str) -> dict[str, str]:
        base = child_env()
        # several busy processes on a small machine: one compute thread each, or the engines'
        # unbound OpenMP threads spin against each other (3-4x slower on 2 cores)
        base.setdefault("OMP_NUM_THREADS", "1")
        return {
            **base,
            "PYTHONUNBUFFERED": "1",
            "TREEPO_REDIS__URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "TREEPO_REDIS__USERNAME": role,
            "TREEPO_REDIS__PASSWORD": PASSWORDS[role],
            "TREEPO_LEARNER__MODEL": str(self.model),
            "TREEPO_SAMPLER__MODEL": str(self.model),
            "TREEPO_LEARNER__WORK_DIR": str(self.work),
            "TREEPO_SAMPLER__WORK_DIR": str(self.root / "samplers"),
            **self.settings,
        }

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if name not in self.logs:
            self.logs[name] = (self.root / f"{name}.log").open("ab")
        log = self.logs[name]
        log.write(f"---- start {time.strftime('%H:%M:%S')}\n".encode())
        log.flush()
        self.procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def start_redis(self) -> None:
        env = {
            **os.environ,
            "RUN_DIR": str(self.root / "redis"),
            "REDIS_PORT": str(self.redis_port),
            "REDIS_LEARNER_PASSWORD": PASSWORDS["learner"],
            "REDIS_SAMPLER_PASSWORD": PASSWORDS["sampler"],
        }
        self._spawn("redis", [str(ROOT / "ops" / "redis-server.sh"), "--bind", "127.0.0.1"], env)
        wait_port(self.redis_port, 30)

    def start_learner(self) -> None:
        cmd = [sys.executable, "-m", "learner.process", "--port", str(self.learner_port)]
        self._spawn("learner", cmd, self.env("learner"))

    def start_sampler(self, name: str) -> None:
        env = {**self.env("sampler"), "TREEPO_SAMPLER__WORKER_ID": name}
        self._spawn(name, [sys.executable, "-m", "workers.sampler", "--port", "0"], env)

    def start(self, samplers: int) -> None:
        self.start_redis()
        self.start_learner()
        for i in range(samplers):
            self.start_sampler(f"sampler-{i}")

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def send(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30) -> float:
        """Send ``sig`` to one process and wait for it to end; returns the seconds it took."""
        proc = self.procs[name]
        started = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        return time.monotonic() - started

    def restart(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.send(name, sig)
        self.restarts += 1
        if name == "redis":
            self.start_redis()
        elif name == "learner":
            self.start_learner()
        else:
            self.start_sampler(name)

    def state(self) -> dict[str, Any] | None:
        checkpoint = latest_checkpoint(self.work / "checkpoints")
        if checkpoint is None:
            return None
        try:
            return json.loads((checkpoint / "state.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def step(self) -> int:
        s = self.state()
        return int(s["step"]) if s else 0

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        for name in list(self.procs):
            if name != "redis" and self.running(name):
                self.send(name, signal.SIGTERM, timeout=10)
        if self.running("redis"):
            self.send("redis", signal.SIGTERM)
        for log in self.logs.values():
            log.close()
        self.logs.clear()
