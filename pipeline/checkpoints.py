"""Where a learner's checkpoints are on disk (no torch): ``<work>/checkpoints/step-<N>`` with
the full model weights in ``model.safetensors`` and its ``state.json``, and ``LATEST`` naming the
newest complete one. ``learner/checkpoint.py`` writes them; the learner's recovery and the
``treepo export`` tool find them here."""

from __future__ import annotations

from pathlib import Path

LATEST = "LATEST"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``<work>/checkpoints``), or None."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None
