"""Settings: env parsing, bounds, the typo shield, shipped config surfaces, the CLI."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.main import config_reference, main
from pipeline.config import (
    LearnerSettings,
    SamplerSettings,
    known_env_names,
    load_settings,
    unknown_env_names,
)
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_nested_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREEPO_TREE__WIDTH", "12")
    monkeypatch.setenv("TREEPO_TREE__INITIAL_DIVERGENCE_RANGE", "[2, 8]")
    monkeypatch.setenv("TREEPO_RUN__NAME", "exp-1")
    monkeypatch.setenv("TREEPO_REDIS__PASSWORD", "s3cret")
    s = load_settings(SamplerSettings)
    assert s.tree.width == 12 and s.tree.initial_divergence_range == (2, 8)
    assert s.run.name == "exp-1"
    assert s.redis.password is not None and s.redis.password.get_secret_value() == "s3cret"
    assert "s3cret" not in s.model_dump_json()


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("TREEPO_TREE__WIDTH", "0", "TREEPO_TREE__WIDTH"),
        ("TREEPO_TREE__WIDTH", "many", "TREEPO_TREE__WIDTH"),
        ("TREEPO_RUN__NAME", "has space", "TREEPO_RUN__NAME"),
        ("TREEPO_REDIS__URL", "http://x", "TREEPO_REDIS__URL"),
        ("TREEPO_RUN__MAX_STALENESS", "-1", "TREEPO_RUN__MAX_STALENESS"),
        ("TREEPO_TREE__FALLBACK_WINDOW", "7", "TREEPO_TREE"),
        ("TREEPO_SAMPLER__TOP_P", "0.9", "TREEPO_SAMPLER__TOP_P.*not supported"),
        ("TREEPO_SAMPLER__TEMPERATURE", "0", "TREEPO_SAMPLER__TEMPERATURE"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, named: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=named):
        load_settings(SamplerSettings)


def test_unknown_variables_are_reported_with_a_suggestion(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TREEPO_TREE__WIDHT", "3")
    monkeypatch.setenv("TREEPO_LOSS__CLIP_LOW", "0.1")  # a learner setting: known, not a typo
    assert unknown_env_names() == ["TREEPO_TREE__WIDHT"]
    with caplog.at_level(logging.WARNING):
        load_settings(SamplerSettings)
    assert "did you mean TREEPO_TREE__WIDTH" in caplog.text


def _env_lines(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_env_example_parses_for_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env_lines(ROOT / ".env.example")
    treepo = {k: v for k, v in env.items() if k.startswith("TREEPO_")}
    assert treepo and not (set(treepo) - known_env_names())
    for k, v in treepo.items():
        monkeypatch.setenv(k, v)
    assert load_settings(SamplerSettings).tree.width == int(env["TREEPO_TREE__WIDTH"])
    assert load_settings(LearnerSettings).learner.total_steps == int(
        env["TREEPO_LEARNER__TOTAL_STEPS"]
    )


def test_procfile_processes_are_console_scripts() -> None:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    lines = dict(
        line.split(":", 1)
        for line in (ROOT / "Procfile").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(lines) == {"redis", "learner", "sampler", "prometheus"}
    for name in ("learner", "sampler"):
        command = next(w for w in lines[name].split() if "=" not in w)  # after VAR=value
        assert command in scripts, command
        module, func = scripts[command].split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func))


def test_configuration_reference_is_current() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == config_reference() + "\n", (
        "regenerate with: treepo config docs --out docs/configuration.md"
    )
    for name in known_env_names():
        if "__" in name:
            assert f"`{name}`" in config_reference()


def test_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["config", "check"]) == 2  # no model directories here (tests/test_preflight.py)
    assert "settings: valid for every process" in capsys.readouterr().out
    assert main(["decode", str(ROOT / "tests" / "data" / "tree_rollout.msgpack")]) == 0
    assert '"tree_id": "t-7"' in capsys.readouterr().out
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00")
    assert main(["decode", str(bad)]) == 1
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and re.search(r"config.*decode|decode.*config", out.stdout, re.S)


def test_pipeline_imports_no_heavy_libraries() -> None:
    """STYLE rule 1: every pipeline module imports without torch, vLLM or DeepSpeed."""
    modules = sorted(p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('pipeline.' + m)\n"
        "heavy = [m for m in ('torch', 'vllm', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"pipeline pulled in: {out.stdout.strip()}"


def test_pipeline_processes_get_no_settings_or_launcher_ranks_from_their_starter() -> None:
    """A learner started by a process that itself holds a torch.distributed group (a test, a
    notebook) must pick its own rendezvous port, and settings come from the run's own files."""
    from pipeline.entry import child_env

    env = child_env({"PATH": "/bin", "TREEPO_RUN__NAME": "x", "MASTER_PORT": "60379", "RANK": "0"})
    assert env == {"PATH": "/bin"}


def test_treepo_reads_the_env_file_as_honcho_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After ``cp .env.example .env``, ``treepo`` sees the same settings the processes get
    from honcho (its own parser agrees on every shipped .env); a variable already in the
    environment wins; a bad line is named."""
    from honcho.environ import parse

    from pipeline.config import read_env_file

    for shipped in [ROOT / ".env.example", *sorted((ROOT / "recipes").glob("*/recipe.env"))]:
        assert read_env_file(shipped) == parse(shipped.read_text()), shipped
    import json
    import os

    env = tmp_path / ".env"
    env.write_text(
        "# a comment\n\nTREEPO_TREE__WIDTH=5  # inline comment\nTREEPO_TREE__MAX_DEPTH='3'\n"
        'TREEPO_RUN__NAME="from-file"\n'
    )
    monkeypatch.chdir(tmp_path)
    for name in ("TREEPO_TREE__WIDTH", "TREEPO_TREE__MAX_DEPTH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TREEPO_RUN__NAME", "explicit")
    try:
        assert main(["config", "show", "--process", "sampler"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["tree"]["width"] == 5 and shown["tree"]["max_depth"] == 3
        assert shown["run"]["name"] == "explicit"
    finally:
        for name in ("TREEPO_TREE__WIDTH", "TREEPO_TREE__MAX_DEPTH"):
            os.environ.pop(name, None)
    env.write_text("TREEPO_TREE__WIDTH=5\nthis is not a setting\n")
    assert main(["config", "show"]) == 2
    assert ".env:2: not a NAME=value line" in capsys.readouterr().err
    assert main(["--env-file", "missing.env", "config", "show"]) == 2
    assert "--env-file missing.env: no such file" in capsys.readouterr().err
