"""Ends a sampler's engine processes when the sampler dies without stopping them.

vLLM's engine runs its model in child processes (its executor's workers) that outlive a
SIGKILLed parent (OOM killer, a crash, `kill -9`), keeping their memory, cores or GPU.
``watch_children`` starts this module as a small process, before the engine, holding the read end of a pipe whose write end only the
sampler holds. The reaper keeps a fresh list of the sampler's descendants (every 0.2 s); when
the sampler ends, by any means, the read returns end-of-file (or the sampler is found gone, when a
forked child keeps the write end open) and the reaper kills the processes of its last list
(checked by creation time, so a reused pid is never hit). Engines that are
still starting are covered too.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

POLL_S = 0.2
_KEEP: list[int] = []


def watch_children() -> subprocess.Popen[bytes]:
    """Start the reaper for this process's descendants (call before starting the engine)."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.reaper", str(os.getpid()), str(read_end)],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the sampler's process group does not reach it
    )
    os.close(read_end)
    _KEEP.append(write_end)  # held open until this process ends
    return proc


def main(argv: list[str]) -> int:
    import psutil

    parent, fd = psutil.Process(int(argv[0])), int(argv[1])
    me = os.getpid()
    known: dict[int, float] = {}
    while not select.select([fd], [], [], POLL_S)[0]:  # readable only at end of file
        try:
            # a process forked by the sampler (without exec) holds the pipe's write end too, and
            # the end of file never comes while it lives: check the sampler itself as well, and
            # keep the list made while it was alive (its orphans are re-parented when it dies)
            if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
                break
            known = {p.pid: p.create_time() for p in parent.children(recursive=True) if p.pid != me}
        except psutil.Error:
            break
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                p.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
