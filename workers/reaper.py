"""Ends a sampler's engine processes when the sampler dies without stopping them.

vLLM's engine core runs in child processes that outlive a SIGKILLed parent (OOM killer, a
crash, `kill -9`), keeping their memory, cores or GPU. ``watch_engine`` starts this module as a
small process holding the read end of a pipe whose write end only the sampler holds: when the
sampler ends, by any means, the read returns end-of-file and the engine processes it was given
(checked by creation time, so a reused pid is never hit) are killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def watch_engine() -> subprocess.Popen[bytes] | None:
    """Start the reaper for every current descendant of this process (call once the engine
    is up); None when there is none."""
    import psutil

    children = psutil.Process().children(recursive=True)
    if not children:
        return None
    read_end, write_end = os.pipe()
    args = [f"{c.pid}:{c.create_time()!r}" for c in children]
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.reaper", str(read_end), *args],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the sampler's process group does not reach it
    )
    os.close(read_end)
    _KEEP.append(write_end)  # held open until this process ends
    return proc


_KEEP: list[int] = []


def main(argv: list[str]) -> int:
    fd = int(argv[0])
    os.read(fd, 1)  # blocks until the sampler is gone (end of file)
    import psutil

    for spec in argv[1:]:
        pid, created = spec.split(":", 1)
        try:
            p = psutil.Process(int(pid))
            if repr(p.create_time()) == created:
                p.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
