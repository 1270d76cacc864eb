"""The reaper ends a dead sampler's processes also when the sampler is a zombie not yet reaped
and a child forked without exec holds the reaper's pipe open (end of file never comes)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from workers.reaper import watch_children

    watch_children()
    time.sleep(0.5)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if os.fork() == 0:  # a forked child without exec: it holds the pipe's write end
        time.sleep(600)
        os._exit(0)
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_children_die_with_an_unreaped_sampler() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
    kids = psutil.Process(parent.pid).children(recursive=True)
    assert len(kids) == 3  # the reaper, the subprocess, the forked child
    reaper = next(k for k in kids if "workers.reaper" in " ".join(k.cmdline()))
    deadline = time.monotonic() + 60
    while "_psutil_linux" not in Path(f"/proc/{reaper.pid}/maps").read_text():
        assert time.monotonic() < deadline, "the reaper did not start"
        time.sleep(0.1)  # a loaded machine can take seconds to start it
    time.sleep(2.0)  # then it lists the descendants every 0.2 s
    parent.send_signal(signal.SIGKILL)  # not waited for yet: a zombie while we watch
    try:
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert alive == [], alive
    finally:
        for k in psutil.Process(parent.pid).children(recursive=True) + kids:
            with contextlib.suppress(psutil.Error):
                k.kill()
        parent.wait()
