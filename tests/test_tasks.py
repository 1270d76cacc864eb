"""The built-in arithmetic task, its checker, and local dataset loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import DatasetError
from pipeline.treepo.tasks import ArithTask, arith_reward, load_dataset, reward_fn


def test_arith_problems_and_solutions_check_out() -> None:
    task = ArithTask()
    for ops in (next(task.sample("train", 0)) for _ in range(3)):
        p = task.problem(ops)
        assert p.prompt == "+".join(map(str, ops)) + "=" and p.answer == str(sum(ops))
        solution = task.solution(ops)
        assert solution.count(";") == len(ops) - 1 and solution.endswith(
            "\\boxed{" + p.answer + "}"
        )
        assert arith_reward(solution, p.answer) == 1.0
        assert arith_reward(solution.replace("\\boxed{", "\\boxed{1"), p.answer) == -1.0


def test_splits_are_disjoint_and_seeded() -> None:
    task = ArithTask()
    train = {p.prompt for p in task.problems("train", 3000, seed=1)}
    held = {p.prompt for p in task.problems("heldout", 500, seed=1)}
    assert not train & held
    assert task.problems("heldout", 20, seed=7) == task.problems("heldout", 20, seed=7)
    assert task.problems("heldout", 20, seed=7) != task.problems("heldout", 20, seed=8)
    with pytest.raises(ValueError, match="split"):
        task.problems("test", 1)


def test_reward_functions_by_name() -> None:
    assert reward_fn("arith")("x;\\boxed{12}", "12") == 1.0
    assert reward_fn("math")("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    with pytest.raises(ValueError, match="unknown reward task"):
        reward_fn("chess")


def test_jsonl_dataset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"q": "1+1?", "a": 2}) + "\n\n" + json.dumps({"q": "2+2?", "a": "4"}) + "\n"
    )
    problems = load_dataset(path, "q", "a", task="math")
    assert [(p.prompt, p.answer, p.task) for p in problems] == [
        ("1+1?", "2", "math"),
        ("2+2?", "4", "math"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"q": "x", "a": "1"}\n{"q": "y"}\n', r"d\.jsonl: row 2: field 'a' is missing"),
        ('{"q": "", "a": "1"}\n', r"row 1: field 'q' is missing or empty"),
        ('{"q": "x", "a": "1"}\nnot json\n', r"row 2: not valid JSON"),
        ("[1, 2]\n", r"row 1: expected an object"),
        ("", r"no rows"),
    ],
)
def test_bad_dataset_rows_name_file_row_and_field(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path, "q", "a")


def test_missing_file_and_parquet_without_pyarrow(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl")
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetError, match="needs pyarrow"):
            load_dataset(parquet)


def test_saved_hugging_face_datasets(tmp_path: Path) -> None:
    """A ``save_to_disk`` directory (a Dataset, or a DatasetDict's train split) reads like a
    file; a bad row is named; a directory that is not a saved dataset says so."""
    datasets = pytest.importorskip("datasets")
    rows = [{"q": "1+1?", "a": "2"}, {"q": "2+3?", "a": "5"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    problems = load_dataset(tmp_path / "plain", "q", "a")
    assert [(p.prompt, p.answer) for p in problems] == [("1+1?", "2"), ("2+3?", "5")]
    split = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows)}
    )
    split.save_to_disk(str(tmp_path / "dict"))
    assert [p.prompt for p in load_dataset(tmp_path / "dict", "q", "a")] == ["1+1?"]
    datasets.Dataset.from_list([{"q": "x", "a": ""}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DatasetError, match="row 1: field 'a'"):
        load_dataset(tmp_path / "bad", "q", "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a saved dataset"):
        load_dataset(tmp_path / "empty", "q", "a")
