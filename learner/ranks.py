"""The learner's ranks: how rank 0 drives the others, and the collectives the update needs.

Under the DeepSpeed launcher every rank runs ``treepo-learner``. Rank 0 is the learner the
outside world sees (Redis, acknowledgements, checkpoint bookkeeping, the weight server, the
step log, ``/metrics``); the other ranks run ``follow``: they wait for rank 0's commands on a
gloo *control group* and take part in what needs every rank:

* ``step``    - the step's trees (msgpack wire bytes); every rank builds the same whole batch
  (advantages and whitening over all of it) and trains on its share of the rows;
* ``save`` / ``resume`` - write or restore this rank's part of a checkpoint;
* ``gather``  - take part in gathering full weights (ZeRO-3) while rank 0 writes them;
* ``ping``    - rank 0 is idle (waiting for trees); sent every ``PING_EVERY_S``, so a rank's
  wait is bounded by the collective timeout even when no work comes;
* ``stop``    - rank 0 is done; exit 0.

A rank that dies breaks the group: the others' next collective fails (gloo notices the closed
connection) or times out after ``TREEPO_LEARNER__RANK_TIMEOUT_S``, they exit non-zero, and the
launcher, seeing a rank exit non-zero, terminates the rest. Nothing is acknowledged that a
checkpoint of *every* rank does not hold, so a restart loses and repeats nothing.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import torch

from pipeline.entry import exit_at_once

log = logging.getLogger(__name__)

PING_EVERY_S = 10.0


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Control:
    """Commands from rank 0 to every other rank, and small CPU collectives, on a gloo group of
    their own (so they work beside NCCL and time out on their own clock)."""

    def __init__(self, timeout_s: float) -> None:
        self.world = world_size()
        self.rank = rank()
        self.group: Any = None
        if self.world > 1:
            self.group = torch.distributed.new_group(
                backend="gloo", timeout=timedelta(seconds=timeout_s)
            )
        self.last_sent = time.monotonic()

    # -- commands --------------------------------------------------------------------------------

    def send(self, kind: str, **fields: Any) -> None:
        """Rank 0: hand a command to every other rank (nothing to do alone)."""
        if self.world == 1:
            return
        data = msgpack.packb({"kind": kind, **fields}, use_bin_type=True)
        self._broadcast(data)
        self.last_sent = time.monotonic()

    def receive(self) -> dict[str, Any]:
        """Other ranks: the next command of rank 0 (blocks up to the group's timeout)."""
        command: dict[str, Any] = msgpack.unpackb(self._broadcast(None), raw=False)
        return command

    def ping_due(self) -> bool:
        return self.world > 1 and time.monotonic() - self.last_sent >= PING_EVERY_S

    def _broadcast(self, data: bytes | None) -> bytes:
        dist = torch.distributed
        size = torch.tensor([0 if data is None else len(data)], dtype=torch.int64, device="cpu")
        dist.broadcast(size, src=0, group=self.group)
        buf = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data is not None
            else torch.empty(int(size.item()), dtype=torch.uint8, device="cpu")
        )
        dist.broadcast(buf, src=0, group=self.group)
        return bytes(buf.numpy().tobytes())

    # -- collectives -----------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.group)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device="cpu")
        torch.distributed.all_reduce(t, group=self.group)
        return [float(v) for v in t.tolist()]

    def max(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device="cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a (CPU-copied) tensor over the ranks, back on its device."""
        if self.world == 1:
            return t
        cpu = t.detach().to("cpu", torch.float64)
        torch.distributed.all_reduce(cpu, group=self.group)
        return cpu.to(t.device, t.dtype)


_CONTROL: Control | None = None


def control(timeout_s: float = 600.0) -> Control:
    """The process's control group (made by every rank at engine start-up, in the same order)."""
    global _CONTROL
    if _CONTROL is None or _CONTROL.world != world_size():
        _CONTROL = Control(timeout_s)
    return _CONTROL


def share(n: int, parts: int, index: int) -> slice:
    """The ``index``-th of ``parts`` contiguous, near-equal slices of ``range(n)``."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return slice(lo, lo + base + (1 if index < extra else 0))


def follow(handlers: dict[str, Callable[[dict[str, Any]], None]], ctl: Control) -> int:
    """Other ranks: carry out rank 0's commands until it says ``stop``; returns the exit code.

    A rank whose rank 0 is gone fails in its next collective (an exception)."""
    while True:
        command = ctl.receive()
        kind = command.pop("kind")
        if kind == "stop":
            return 0
        if kind == "ping":
            continue
        handler = handlers.get(kind)
        if handler is None:
            raise RuntimeError(f"rank {ctl.rank}: unknown command {kind!r} from rank 0")
        handler(command)


def leave(code: int = 0) -> NoReturn:
    """End a launched rank at once, after every rank has arrived here. The interpreter's own
    teardown can abort after the work is done (gloo's threads: "terminate called without an
    active exception"), which the launcher reports as a failed run; ``treepo-learner`` leaves
    the same way (``pipeline.entry.exit_now``)."""
    control().barrier()
    exit_at_once(code)


def launch(ranks: int, module: str, argv: list[str]) -> int:
    """Become ``deepspeed --num_gpus <ranks> --no_local_rank --module <module> <argv>``:
    DeepSpeed's launcher starts every rank (one per GPU; on CPU, gloo ranks) and ends them all
    when one fails. Across machines, run the launcher with a hostfile (docs/operations.md)."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which(
        "deepspeed"
    )
    if launcher is None:
        log.error("--ranks %d needs the DeepSpeed launcher (pip install deepspeed)", ranks)
        return 2
    port = int(os.environ.get("MASTER_PORT") or free_port())
    command = launcher_command(launcher, ranks, port)
    os.execv(launcher, [*command, "--module", module, *argv])


def launcher_command(launcher: str, ranks: int, port: int) -> list[str]:
    """``deepspeed`` on one machine: ``ranks`` local ranks meeting at ``port``; the program and
    its arguments follow."""
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(port), "--no_local_rank"]


def free_port() -> int:
    """A free TCP port for the rendezvous (``MASTER_PORT``), taken below the kernel's ephemeral
    range: a port the OS hands out for outgoing connections (Redis clients, engines) could be
    taken between this check and the rank-0 store's bind (seen as EADDRINUSE in CI)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000 for the learner's rendezvous")
