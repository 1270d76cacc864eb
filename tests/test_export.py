"""``treepo export``: a learner checkpoint (any step, also of a run that stopped early) as a
Hugging Face model directory that transformers loads with the checkpoint's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from learner.checkpoint import model_tensors
from pipeline.cli.export import export_checkpoint
from pipeline.cli.main import main
from pipeline.errors import ConfigError


def fake_checkpoint(root: Path, step: int, module: torch.nn.Module) -> Path:
    """A checkpoint directory as the learner writes one (weights + state + LATEST)."""
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    save_file(model_tensors(module), str(path / "model.safetensors"))
    (path / "state.json").write_text(json.dumps({"step": step}))
    (root / "LATEST").write_text(path.name)
    return path


def test_export_gives_a_model_directory_with_the_checkpoint_weights(
    toy_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(toy_model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "trained"
    work = tmp_path / "learner"
    fake_checkpoint(work / "checkpoints", 7, model)
    monkeypatch.setenv("TREEPO_LEARNER__WORK_DIR", str(work))
    monkeypatch.setenv("TREEPO_LEARNER__MODEL", str(toy_model))
    assert main(["export"]) == 0
    out = work / "model-step-00000007"
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())

    # a checkpoint of another model is refused, naming what does not fit; nothing is written
    other = tmp_path / "other"
    shutil.copytree(toy_model, other)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    bigger = AutoModelForCausalLM.from_config(
        AutoModelForCausalLM.from_pretrained(str(toy_model)).config.__class__(**config)
    )
    ckpt = fake_checkpoint(tmp_path / "other-ckpt", 1, bigger)
    with pytest.raises(ConfigError, match="does not fit the model"):
        export_checkpoint(ckpt, toy_model, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()
    monkeypatch.setenv("TREEPO_LEARNER__WORK_DIR", str(tmp_path / "empty"))
    assert main(["export"]) == 2
