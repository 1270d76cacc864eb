"""One run seed for every source of randomness in a run.

``TREEPO_RUN__SEED`` is the only seed a user sets. Each consumer draws its own from it with
``derived_seed(run_seed, purpose, ...)`` (a hash, so streams for different purposes and
different samplers are unrelated and none depends on Python's randomised ``hash``):

* the learner: prompt order (``EpochOrder``), the toy task's problems, dropout per step, and
  torch's global generator at start (``learner``);
* each sampler: its vLLM engine's seed (``engine``) and its tree shapes (``tree``: random root
  fan-out), keyed by ``sampler_key`` so two samplers never draw the same numbers while the same
  sampler draws the same numbers in every run of the seed on the same machine.

What one seed cannot pin down is timing: which trees share an engine step depends on when
requests arrive, and vLLM's sampler draws from one generator per engine step, so beyond the first
trees two runs of one seed drift apart. (vLLM's per-request seeds would remove that, but its CPU
backend fails on them: ``CPU Generator does not use offset``.)
"""

from __future__ import annotations

import hashlib
import socket


def derived_seed(run_seed: int, purpose: str, *parts: object) -> int:
    """A 32-bit seed for ``purpose`` (and ``parts``) drawn from the run's seed."""
    text = "/".join(str(p) for p in (run_seed, purpose, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def sampler_key(worker_id: str, port: int) -> str:
    """What tells one sampler from another across runs: its configured worker id, else its host
    and metrics port (honcho gives each process of ``-c sampler=N`` its own ``$PORT``), never
    the process id."""
    return worker_id or f"{socket.gethostname()}:{port}"
