"""Learner checkpoints: safetensors and JSON only (no pickle), written atomically.

A checkpoint directory ``<work>/checkpoints/step-<N>`` holds:

* ``model.safetensors`` - the model's parameters (shared tensors stored once);
* ``optimizer-rank<r>.safetensors`` + ``optimizer-rank<r>.json`` - each rank's optimizer state
  tensors and the rest of its state (param groups, scalars);
* ``rng-rank<r>.safetensors`` - torch RNG state;
* ``state.json`` - step, policy version, dataset cursor, Python RNG state, the ids of every tree
  already trained, counters.

It is written under a temporary name and renamed into place, then ``LATEST`` is replaced (also
by rename), so a crash leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from pipeline.fsutil import staged_dir

LATEST = "LATEST"


def _flatten_optimizer(
    opt: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            name = f"state.{idx}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rank: int = 0,
    keep: int = 2,
) -> Path:
    """Write one checkpoint (rank 0 writes the model and state; every rank its optimizer)."""
    final = root / f"step-{step:08d}"
    with staged_dir(final) as tmp:
        if rank == 0:
            save_model(module, str(tmp / "model.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state))
        tensors, meta = _flatten_optimizer(optimizer)
        save_file(tensors, str(tmp / f"optimizer-rank{rank}.safetensors"))
        (tmp / f"optimizer-rank{rank}.json").write_text(json.dumps(meta))
        save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-rank{rank}.safetensors"))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    if rank == 0:
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(
    path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> dict[str, Any]:
    """Restore module, optimizer and RNG in place; returns the saved learner state."""
    missing, unexpected = load_model(module, str(path / "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ValueError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    tensors = load_file(str(path / f"optimizer-rank{rank}.safetensors"))
    meta = json.loads((path / f"optimizer-rank{rank}.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
    torch.set_rng_state(load_file(str(path / f"rng-rank{rank}.safetensors"))["torch"])
    state: dict[str, Any] = json.loads((path / "state.json").read_text())
    return state
