"""``treepo config check`` finds what would fail minutes into a start-up, one line per problem
naming the setting; the other commands turn expected failures into one line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.services import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def model_dir(path: Path, weights: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


def dataset(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_good_setup_passes(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    model = model_dir(tmp_path / "model")
    data = dataset(tmp_path / "train.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    monkeypatch.setenv("TREEPO_REDIS__URL", redis_server.url)
    monkeypatch.setenv("TREEPO_SAMPLER__MODEL", str(model))
    monkeypatch.setenv("TREEPO_LEARNER__MODEL", str(model))
    monkeypatch.setenv("TREEPO_LEARNER__DATASET", str(data))
    assert main(["config", "check"]) == 0
    assert "models, dataset and Redis: ok" in capsys.readouterr().out


def test_each_problem_is_one_line_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TREEPO_REDIS__URL", f"redis://127.0.0.1:{free_port()}/0")  # nobody
    monkeypatch.setenv("TREEPO_SAMPLER__MODEL", "Qwen/Qwen2.5-Math-1.5B")  # a hub id
    monkeypatch.setenv("TREEPO_LEARNER__MODEL", str(model_dir(tmp_path / "m", weights=False)))
    bad = dataset(tmp_path / "bad.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "x"}])
    monkeypatch.setenv("TREEPO_LEARNER__DATASET", str(bad))
    started = time.monotonic()
    assert main(["config", "check"]) == 2
    assert time.monotonic() - started < 30
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("TREEPO_")]
    assert len(lines) == 4, lines
    assert (
        "TREEPO_SAMPLER__MODEL: 'Qwen/Qwen2.5-Math-1.5B' is not a directory (a hub id?" in lines[0]
    )
    assert lines[1].startswith("TREEPO_LEARNER__MODEL:") and "no .safetensors" in lines[1]
    assert lines[2].startswith("TREEPO_LEARNER__DATASET:") and "row 2" in lines[2]
    assert lines[3].startswith("TREEPO_REDIS__URL:") and "does not answer" in lines[3]
    monkeypatch.setenv("TREEPO_LEARNER__DATASET", str(tmp_path / "missing.jsonl"))
    monkeypatch.setenv("TREEPO_SAMPLER__MODEL", "")
    assert main(["config", "check"]) == 2
    out = capsys.readouterr().out
    assert "TREEPO_SAMPLER__MODEL: not set" in out and "missing.jsonl: no such file" in out


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_expected_failures_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    import os

    down = {**os.environ, "TREEPO_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0"}
    for args in (["status"], ["tree", "show", "--out", str(tmp_path / "t.html")]):
        out = cli(*args, env=down)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and out.stderr.startswith("treepo: redis")
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = cli("tree", "show", str(tmp_path / "nope.msgpack"))
    assert out.returncode == 2 and "nope.msgpack" in out.stderr and "Traceback" not in out.stderr
    assert cli("--log-level", "debug", "config", "show").returncode == 0  # lowercase accepted


def test_a_closed_pipe_ends_quietly() -> None:
    """``treepo config show | head -n 1``: the reader is gone before the output is written (its
    end of the pipe is closed first, so the write fails whatever the output's size)."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "config", "show", "--process", "learner"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    finally:
        os.close(write)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "BrokenPipe" not in shown.stderr
