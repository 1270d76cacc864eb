"""The shipped recipes: their settings load for every process, and the GSM8K preparation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import (
    LearnerSettings,
    SamplerSettings,
    known_env_names,
    load_settings,
    read_env_file,
)
from pipeline.tasks import gsm8k_answer, load_dataset, reward_fn

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.parent for p in (ROOT / "recipes").glob("*/recipe.env"))


def test_there_are_recipes() -> None:
    assert {p.name for p in RECIPES} >= {"toy", "qwen2.5-math-gsm8k"}
    assert all((p / "README.md").is_file() for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_settings_load_for_every_process(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = read_env_file(recipe / "recipe.env")
    treepo = {k: v for k, v in env.items() if k.startswith("TREEPO_")}
    assert treepo and not (set(treepo) - known_env_names()), set(treepo) - known_env_names()
    for k, v in treepo.items():
        monkeypatch.setenv(k, v)
    learner = load_settings(LearnerSettings, warn=False)
    sampler = load_settings(SamplerSettings, warn=False)
    reward_fn(learner.learner.task)
    reward_fn(sampler.sampler.default_task)
    if recipe.name == "qwen2.5-math-gsm8k":
        assert "\\boxed{}" in learner.learner.system_prompt and learner.learner.chat_template


def test_gsm8k_preparation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gsm8k_answer("She pays 3 * 24 = <<3*24=72>>72 dollars.\n#### 72") == "72"
    assert gsm8k_answer("... #### 1,072") == "1072"
    source = tmp_path / "train.jsonl"
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "Half of 1,000?", "answer": "1000/2=<<1000/2=500>>500\n#### 500"},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gsm8k.jsonl"
    assert main(["data", "gsm8k", str(source), str(out)]) == 0
    problems = load_dataset(out, task="math")
    assert [(p.prompt, p.answer) for p in problems] == [
        (rows[0]["question"], "7"),
        (rows[1]["question"], "500"),
    ]
    # the math reward credits a boxed answer equal to the extracted one
    assert reward_fn("math")("so \\boxed{500}", problems[1].answer) == 1.0
    source.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    assert main(["data", "gsm8k", str(source), str(out)]) == 2
    assert "row 1: field 'answer': no '#### answer' line" in capsys.readouterr().err
