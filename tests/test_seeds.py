"""One run seed drives every source of randomness: derived seeds, per-sampler engine seeds, and
the first trees of a real engine (same seed: the same trees; another seed: others)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import SamplerSettings
from pipeline.seeds import derived_seed, sampler_key
from workers.engine import EngineOptions
from workers.trees import tree_rng

ROOT = Path(__file__).resolve().parent.parent


def test_derived_seeds_are_a_hash_of_seed_and_purpose() -> None:
    expected = int.from_bytes(hashlib.sha256(b"7/engine/h:1").digest()[:4], "little")
    assert derived_seed(7, "engine", "h:1") == expected
    seeds = {derived_seed(s, p, k) for s in (0, 1) for p in ("engine", "tree") for k in "ab"}
    assert len(seeds) == 8


def test_each_sampler_draws_its_own_numbers_and_the_same_in_every_run() -> None:
    def settings(port: int, worker_id: str = "", seed: int = 3) -> SamplerSettings:
        s = SamplerSettings()
        s.run = s.run.model_copy(update={"seed": seed})
        s.sampler = s.sampler.model_copy(update={"port": port, "worker_id": worker_id})
        return s

    def engine_seed(s: SamplerSettings) -> int:
        return EngineOptions.from_settings(s, "m").seed

    assert sampler_key("", 5100) == f"{socket.gethostname()}:5100"
    assert sampler_key("w1", 5100) == "w1"
    a, b = settings(5100), settings(5101)
    assert engine_seed(a) != engine_seed(b)  # two samplers of one run
    assert engine_seed(a) == engine_seed(settings(5100))  # the same sampler in another run
    assert engine_seed(a) != engine_seed(settings(5100, seed=4))
    assert engine_seed(settings(5100, "w1")) == engine_seed(settings(5200, "w1"))
    draws = [tree_rng(s).random() for s in (a, settings(5100), b)]
    assert draws[0] == draws[1] != draws[2]


def first_trees(toy_model: Path, tmp_path: Path, seed: int, name: str) -> list[list[list[int]]]:
    out = tmp_path / f"{name}.json"
    env = {
        **os.environ,
        "TREEPO_RUN__SEED": str(seed),
        "TREEPO_SAMPLER__PORT": "5100",
        "TREEPO_TREE__WIDTH": "4",
        "TREEPO_TREE__SEGMENT_TOKENS": "4",
        "TREEPO_TREE__MAX_DEPTH": "6",
        "TREEPO_TREE__INITIAL_DIVERGENCE_RANGE": "[1,4]",
        "TREEPO_SAMPLER__KV_CACHE_GIB": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "tests.seed_probe", str(toy_model), str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trees: list[list[list[int]]] = json.loads(out.read_text())
    return trees


@pytest.mark.slow
def test_the_same_seed_grows_the_same_first_trees(toy_model: Path, tmp_path: Path) -> None:
    """Three sampler processes on the real engine: seed 11 twice, seed 12 once."""
    one = first_trees(toy_model, tmp_path, 11, "one")
    again = first_trees(toy_model, tmp_path, 11, "again")
    other = first_trees(toy_model, tmp_path, 12, "other")
    assert len(one) == 2 and all(len(tree) == 4 for tree in one)
    assert one == again
    assert other != one
