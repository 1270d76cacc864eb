"""reasoning-gym as a task source: ``treepo data reasoning-gym`` and the ``rg`` rewards, scored by
each dataset's own verifier (reference answers are correct, others wrong), on a few tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.errors import DatasetError
from pipeline.treepo.gym import extract, prepare
from pipeline.treepo.rewards import CORRECT, WRONG
from pipeline.treepo.tasks import load_dataset, reward_fn

TASKS = [
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("chain_sum", {"min_terms": 2, "max_terms": 3}),
    ("leg_counting", {}),
]


@pytest.mark.parametrize(("name", "config"), TASKS)
def test_entries_score_with_their_own_verifier(tmp_path: Path, name: str, config: dict) -> None:  # type: ignore[type-arg]
    train, held_out, n = prepare(name, tmp_path, train=30, eval_size=20, seed=3, config=config)
    assert n == 20
    problems = load_dataset(train, task="rg")
    evals = load_dataset(held_out, task="rg")
    assert len(problems) == 30
    assert not {p.prompt for p in problems} & {p.prompt for p in evals}  # disjoint questions
    score = reward_fn("rg")
    for p in problems + evals:
        answer = json.loads(p.answer)["entry"]["answer"]
        assert score(f"Let me think.\nThe answer is {answer}.", p.answer) == CORRECT
        assert score(f"so \\boxed{{{answer}}}", p.answer) == CORRECT
        assert score("The answer is 123456789.", p.answer) == WRONG
        assert score("no idea", p.answer) == WRONG
    # the same questions again from the same seed
    again, _, _ = prepare(name, tmp_path / "again", train=30, eval_size=20, seed=3, config=config)
    assert again.read_text() == train.read_text()


def test_extraction_rules() -> None:
    rules = {name: reward_fn(name) for name in ("rg", "rg_boxed", "rg_answer_is", "rg_last_number")}
    assert set(rules)  # every rule is a registered reward
    from pipeline.treepo.gym import EXTRACTORS

    text = "3 + 4 = 7, so the answer is 7. Check: 1,200 apples"
    assert extract(text, EXTRACTORS["rg"]) == ("7", 1)  # no box: "answer is" before last number
    assert extract(text, EXTRACTORS["rg_last_number"]) == ("1200", 0)
    assert extract("\\boxed{-3} then 5", EXTRACTORS["rg"]) == ("-3", 0)
    assert extract("nothing here", EXTRACTORS["rg_boxed"]) == (None, -1)


def test_partial_credit_is_not_a_reward(tmp_path: Path) -> None:
    """The verifier gives 0.2 to '12345' against '2' (it contains it): that is wrong here."""
    train, _, _ = prepare("basic_arithmetic", tmp_path, 5, 1, 0, dict(TASKS[0][1]))
    p = load_dataset(train, task="rg")[0]
    answer = json.loads(p.answer)["entry"]["answer"]
    assert reward_fn("rg")(f"The answer is {answer}9999", p.answer) == WRONG


def test_format_bonus_goes_to_the_first_rule(tmp_path: Path) -> None:
    train, _, _ = prepare("chain_sum", tmp_path, 3, 1, 0, {}, format_bonus=0.25)
    p = load_dataset(train, task="rg")[0]
    answer = json.loads(p.answer)["entry"]["answer"]
    assert reward_fn("rg")(f"\\boxed{{{answer}}}", p.answer) == CORRECT + 0.25
    assert reward_fn("rg")(f"The answer is {answer}", p.answer) == CORRECT


def test_the_data_command_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # type: ignore[type-arg]
    out = tmp_path / "d"
    args = ["data", "reasoning-gym", "chain_sum", "--train", "8", "--eval", "4", "--out", str(out)]
    assert main([*args, "--config", "min_terms=2", "--config", "max_terms=2"]) == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 8
    assert json.loads((out / "meta.json").read_text())["config"] == {"min_terms": 2, "max_terms": 2}
    capsys.readouterr()
    assert main(["data", "reasoning-gym", "no_such_task", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown reasoning-gym dataset 'no_such_task'" in err[0]
    assert main([*args, "--config", "no_such_key=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad --config" in err[0], err
    assert main([*args, "--config", "nonsense"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="at least 1"):
        prepare("chain_sum", tmp_path, 0, 1)


def test_a_reference_that_is_not_an_entry_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a reasoning-gym entry"):
        reward_fn("rg")("The answer is 3", "3")


def test_an_eval_split_the_task_cannot_fill_is_refused(tmp_path: Path) -> None:
    """Single-digit sums have 81 questions: 400 distinct held-out ones do not exist."""
    small = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"],
             "allow_negation": False, "allow_parentheses": False}  # fmt: skip
    with pytest.raises(DatasetError, match=r"only \d+ distinct questions outside the 50-problem"):
        prepare("basic_arithmetic", tmp_path, 50, 400, 0, small)
    _, held_out, n = prepare("basic_arithmetic", tmp_path, 20, 30, 0, small)
    questions = [json.loads(x)["prompt"] for x in held_out.read_text().splitlines()]
    assert n == 30 and len(set(questions)) == 30  # each held-out question once
