"""``treepo config check`` finds what would fail minutes into a start-up, one line per problem
naming the setting; the other commands turn expected failures into one line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli.main import main
from tests.services import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def model_dir(path: Path, weights: bool = True, chat: bool = False) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path / "tokenizer.json"))
    config = {"chat_template": "{{ messages[0]['content'] }}"} if chat else {}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
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
    assert (
        "models, tokenizers, dataset, rewards, Redis and weight URL: ok" in capsys.readouterr().out
    )


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


def test_tokenizer_template_reward_and_weight_url_are_checked(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    good = model_dir(tmp_path / "good")
    broken = model_dir(tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{}")
    monkeypatch.setenv("TREEPO_REDIS__URL", redis_server.url)
    monkeypatch.setenv("TREEPO_SAMPLER__MODEL", str(broken))
    monkeypatch.setenv("TREEPO_LEARNER__MODEL", str(good))
    monkeypatch.setenv("TREEPO_LEARNER__CHAT_TEMPLATE", "true")  # the good tokenizer has none
    monkeypatch.setenv("TREEPO_LEARNER__TASK", "no_such_module_xyz:score")
    monkeypatch.setenv("TREEPO_WEIGHTS__PUBLIC_URL", f"http://127.0.0.1:{free_port()}")
    assert main(["config", "check"]) == 2
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("TREEPO_")]
    assert len(lines) == 4, lines
    assert lines[0].startswith("TREEPO_SAMPLER__MODEL:") and "does not load" in lines[0]
    assert lines[1].startswith("TREEPO_LEARNER__CHAT_TEMPLATE:") and "no chat template" in lines[1]
    assert lines[2].startswith("TREEPO_LEARNER__TASK:") and "cannot import" in lines[2]
    assert lines[3].startswith("TREEPO_WEIGHTS__PUBLIC_URL:") and "does not answer" in lines[3]
    monkeypatch.setenv("TREEPO_SAMPLER__MODEL", str(good))
    monkeypatch.setenv("TREEPO_LEARNER__MODEL", str(model_dir(tmp_path / "chat", chat=True)))
    monkeypatch.setenv("TREEPO_LEARNER__TASK", "math")
    monkeypatch.delenv("TREEPO_WEIGHTS__PUBLIC_URL")
    monkeypatch.setenv("TREEPO_LEARNER__CHAT_TEMPLATE", "false")
    monkeypatch.setenv("TREEPO_LEARNER__SYSTEM_PROMPT", "Be brief.")
    assert main(["config", "check"]) == 2
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("TREEPO_")]
    assert lines == [
        "TREEPO_LEARNER__SYSTEM_PROMPT: needs TREEPO_LEARNER__CHAT_TEMPLATE=true (the system "
        "message goes through the chat template)"
    ]
    monkeypatch.setenv("TREEPO_LEARNER__CHAT_TEMPLATE", "true")
    assert main(["config", "check"]) == 0


def test_a_toml_settings_file_sits_under_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    """``--config FILE``: its values apply, the environment overrides them, a typo in it is one
    line naming file and key."""
    from pipeline.config import SamplerSettings, load_settings

    file = tmp_path / "run.toml"
    file.write_text('[run]\nname = "from-file"\n[tree]\nwidth = 12\nsegment_tokens = 64\n')
    monkeypatch.setenv("TREEPO_TREE__WIDTH", "6")
    s = load_settings(SamplerSettings, config=file)
    assert (s.run.name, s.tree.width, s.tree.segment_tokens) == ("from-file", 6, 64)
    monkeypatch.setenv("TREEPO_CONFIG_FILE", str(file))
    assert load_settings(SamplerSettings).run.name == "from-file"
    assert main(["--config", str(file), "config", "show", "--process", "sampler"]) == 0
    assert '"from-file"' in capsys.readouterr().out
    file.write_text("[tree]\nwidht = 3\n")
    assert main(["--config", str(file), "config", "show", "--process", "sampler"]) == 2
    err = capsys.readouterr().err
    assert "unknown key tree.widht; did you mean width?" in err and "Traceback" not in err
    file.write_text("[tree\n")
    assert main(["--config", str(file), "config", "show", "--process", "sampler"]) == 2
    assert "not TOML" in capsys.readouterr().err


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", *args],
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
            [sys.executable, "-m", "pipeline.cli.main", "config", "show", "--process", "learner"],
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
