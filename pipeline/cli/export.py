"""``treepo export``: a learner checkpoint (``pipeline/checkpoints.py``) as a normal Hugging Face
model directory. An export is the base model directory's configuration, tokenizer and
generation files with those weights: what ``transformers`` and vLLM load, at any step of a run,
including one that stopped before its end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.errors import ConfigError, WeightVerificationError
from pipeline.fsutil import staged_dir
from pipeline.weights.manifest import safetensors_header, tensor_specs

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")


def export_checkpoint(checkpoint: Path, base: Path, out: Path) -> Path:
    """Write ``out``: ``base``'s files except its weights, and the checkpoint's weights, after
    checking that they fit the base model (tensor names and shapes; a tied output embedding may
    be absent). Appears whole or not at all."""
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{checkpoint}: no model.safetensors (not a learner checkpoint)")
    if not (base / "config.json").is_file():
        raise ConfigError(f"{base}: not a model directory (no config.json)")
    try:
        got, want = safetensors_header(weights), tensor_specs(base)
    except WeightVerificationError as exc:
        raise ConfigError(f"export: {exc}") from None
    unexpected = sorted(set(got) - set(want))
    missing = sorted(n for n in set(want) - set(got) if not n.startswith("lm_head."))
    wrong = sorted(n for n in set(got) & set(want) if got[n][1] != want[n][1])
    if unexpected or missing or wrong:
        raise ConfigError(
            f"{checkpoint} does not fit the model {base}: unexpected {unexpected[:3]}, "
            f"missing {missing[:3]}, other shapes {wrong[:3]}"
        )
    with staged_dir(out) as tmp:
        for item in base.iterdir():
            if item.is_file() and not any(item.match(p) for p in WEIGHT_FILES):
                shutil.copy2(item, tmp / item.name)
        shutil.copy2(weights, tmp / "model.safetensors")
    return out
