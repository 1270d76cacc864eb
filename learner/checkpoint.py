"""Learner checkpoints: safetensors and JSON only (no pickle), written atomically by every rank.

A checkpoint directory ``<work>/checkpoints/step-<N>`` holds:

* ``model.safetensors`` - the model's full parameters (gathered under ZeRO-3; shared tensors
  stored once), written by rank 0;
* ``optimizer-rank<r>.safetensors`` + ``optimizer-rank<r>.json`` - each rank's optimizer state
  tensors (under ZeRO 1-3 its partition, with the fp32 master partition it updates) and the
  rest of its state (param groups, scalars);
* ``rng-rank<r>.safetensors`` - each rank's torch RNG state;
* ``ranks.json`` - world size and ZeRO stage (a restart must match both);
* ``state.json`` - step, policy version, dataset cursor, Python RNG state, the ids of every tree
  already trained, counters.

Every rank writes its files into one staging directory (on a filesystem all the learner's
machines share); only when all have written and synced does rank 0 rename it into place and
replace ``LATEST`` (also by rename), so a crash of any rank leaves either the old or the new
checkpoint, never part of one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from learner.ranks import Control
from learner.trainer import Engine, full_parameters
from pipeline.checkpoints import LATEST
from pipeline.errors import ConfigError


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


def model_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state as contiguous CPU copies, a tensor tied under two names stored once
    (ZeRO 1-2 keep parameters as views of one flat buffer, which ``save_model`` refuses)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in module.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().clone().contiguous()
    return out


@contextmanager
def optimizer_view(engine: Engine) -> Iterator[torch.optim.Optimizer]:
    """The inner torch optimizer with its parameter groups in place. ZeRO-3 keeps them empty
    between steps (it hands the optimizer one fp32 partition at a time) and fills them only to
    save or load state; the same DeepSpeed calls do it here."""
    zero = engine.ds.optimizer if engine.zero_stage == 3 else None
    if zero is not None:
        zero._set_fp32_optimizer_param_groups()
    try:
        yield engine.optimizer
    finally:
        if zero is not None:
            zero._clear_fp32_optimizer_param_groups()


def _masters(engine: Engine) -> list[torch.Tensor]:
    """The tensors the optimizer updates when they are not the module's own parameters: the
    fp32 master weights of bf16/fp16 training and ZeRO 1-3's per-rank fp32 partitions (restored
    as saved, so every precision and stage resumes exactly). Inside ``optimizer_view``."""
    own = {id(p) for p in engine.module.parameters()}
    return [
        p for group in engine.optimizer.param_groups for p in group["params"] if id(p) not in own
    ]


def save_checkpoint(
    root: Path,
    step: int,
    engine: Engine,
    state: dict[str, Any],
    ctl: Control,
    keep: int = 2,
) -> Path:
    """Write one checkpoint; every rank calls it (rank 0 passes the learner ``state``)."""
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.partial"
    if ctl.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*"):  # left by a crash (any rank's)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    ctl.barrier()
    with full_parameters(engine):
        if ctl.rank == 0:
            save_file(model_tensors(engine.module), str(tmp / "model.safetensors"))
    if ctl.rank == 0:
        (tmp / "state.json").write_text(json.dumps(state))
        layout = {"world_size": ctl.world, "zero_stage": engine.zero_stage}
        (tmp / "ranks.json").write_text(json.dumps(layout))
    with optimizer_view(engine) as optimizer:
        tensors, meta = _flatten_optimizer(optimizer)
        for i, master in enumerate(_masters(engine)):
            tensors[f"master.{i}"] = master.detach().cpu().contiguous()
    r = ctl.rank
    save_file(tensors, str(tmp / f"optimizer-rank{r}.safetensors"))
    (tmp / f"optimizer-rank{r}.json").write_text(json.dumps(meta))
    save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-rank{r}.safetensors"))
    mine = [f"optimizer-rank{r}.safetensors", f"optimizer-rank{r}.json", f"rng-rank{r}.safetensors"]
    if r == 0:
        mine += ["model.safetensors", "state.json", "ranks.json"]
    # only this rank's own files: another rank may be mid-write (its writer's temporary files)
    for name in mine:
        with (tmp / name).open("rb") as fh:
            os.fsync(fh.fileno())
    ctl.barrier()  # every rank's files are on disk
    if ctl.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def check_layout(path: Path, world: int, zero_stage: int) -> None:
    """Refuse a checkpoint written by another number of ranks or another ZeRO stage (their
    optimizer partitions do not fit). Checkpoints without ``ranks.json`` are one-rank ZeRO-0."""
    file = path / "ranks.json"
    saved = json.loads(file.read_text()) if file.is_file() else {"world_size": 1, "zero_stage": 0}
    if saved["world_size"] != world:
        raise ConfigError(
            f"{path} was written by {saved['world_size']} learner rank(s); this learner has "
            f"{world}: restart with {saved['world_size']} rank(s) (or a new work directory)"
        )
    if saved["zero_stage"] != zero_stage:
        raise ConfigError(
            f"{path} was written with ZeRO stage {saved['zero_stage']}; this learner has "
            f"TREEPO_LEARNER__ZERO_STAGE={zero_stage}"
        )


def load_checkpoint(path: Path, engine: Engine, ctl: Control) -> dict[str, Any]:
    """Restore module, optimizer (this rank's partition) and RNG in place; every rank calls it.
    Returns the saved learner state."""
    check_layout(path, ctl.world, engine.zero_stage)
    module = engine.module
    with full_parameters(engine, modifier_rank=0):  # ZeRO-3: rank 0 loads, then re-partitions
        if ctl.rank == 0 or engine.zero_stage != 3:
            saved = load_file(str(path / "model.safetensors"))
            missing, unexpected = module.load_state_dict(saved, strict=False)
            if unexpected or [m for m in missing if "lm_head" not in m]:
                raise ValueError(
                    f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]})"
                )
    r = ctl.rank
    tensors = load_file(str(path / f"optimizer-rank{r}.safetensors"))
    meta = json.loads((path / f"optimizer-rank{r}.json").read_text())
    with optimizer_view(engine) as optimizer:
        for i, master in enumerate(_masters(engine)):
            saved = tensors.pop(f"master.{i}")
            if saved.shape != master.shape:
                raise ValueError(f"{path}: rank {r} master partition {i} has another shape")
            master.data.copy_(saved)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
    torch.set_rng_state(load_file(str(path / f"rng-rank{r}.safetensors"))["torch"])
    state: dict[str, Any] = json.loads((path / "state.json").read_text())
    return state
