"""reasoning-gym as a task source: procedural datasets with their own verifiers.

``prepare`` writes a train and an eval split of one reasoning-gym dataset
(``rg.create_dataset(name, seed=, size=, **config)``) in this project's JSONL layout: the prompt
is the entry's question; the answer field holds the whole entry (question, answer, metadata) as
JSON, so the reward can score with the dataset's own ``score_answer``. The eval split holds no
question of the train split.

The rewards (``TREEPO_LEARNER__TASK``) extract an answer from the response and score it with the
dataset's verifier: ``rg`` tries ``\\boxed{...}``, then "answer is X", then the last number;
``rg_boxed``, ``rg_answer_is`` and ``rg_last_number`` use one rule only. A verifier's score of 1
is ``CORRECT``, anything less ``WRONG`` (verifiers give partial credit to answers that merely
contain the right one, e.g. 0.2 for "12345" against "2", which would reward guessing strings).
An entry may carry ``format_bonus`` (``--format-bonus``): added to a correct answer's reward when
it came by the first rule the task tries (a nudge toward the asked-for form).

reasoning-gym is imported only when a dataset is made or scored (the ``tasks`` extra).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.errors import DatasetError
from pipeline.treepo.rewards import CORRECT, WRONG, last_boxed

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*(" + NUMBER + r"|[^\s.,;]+)", re.IGNORECASE)
LAST_NUMBER = re.compile(NUMBER)


def _answer_is(text: str) -> str | None:
    found = ANSWER_IS.findall(text)
    return found[-1] if found else None


def _last_number(text: str) -> str | None:
    found = LAST_NUMBER.findall(text)
    return found[-1] if found else None


EXTRACTORS: dict[str, tuple[Callable[[str], str | None], ...]] = {
    "rg": (last_boxed, _answer_is, _last_number),
    "rg_boxed": (last_boxed,),
    "rg_answer_is": (_answer_is,),
    "rg_last_number": (_last_number,),
}
"""Reward task name -> the extraction rules it tries, in order."""


def extract(text: str, rules: tuple[Callable[[str], str | None], ...]) -> tuple[str | None, int]:
    """(the answer the first matching rule finds, that rule's index; -1 when none matched),
    with thousands separators and a trailing period removed."""
    for i, rule in enumerate(rules):
        found = rule(text)
        if found is not None and found.strip():
            value = found.strip().rstrip(".")
            if re.fullmatch(NUMBER, value):
                value = value.replace(",", "")
            return value, i
    return None, -1


@cache
def _rg() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise DatasetError(
            "reasoning-gym tasks need the reasoning-gym package (pip install -e '.[tasks]')"
        ) from None
    return reasoning_gym


@cache
def _scorer(name: str) -> Callable[[Any, dict[str, Any]], float]:
    return _rg().get_score_answer_fn(name)  # type: ignore[no-any-return]


def make_reward(task: str) -> Callable[[str, str], float]:
    rules = EXTRACTORS[task]

    def reward(response: str, reference: str) -> float:
        try:
            record = json.loads(reference)
            entry = record["entry"]
            name = entry["metadata"]["source_dataset"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"task {task}: the reference is not a reasoning-gym entry (prepare the data with "
                "`treepo data reasoning-gym`)"
            ) from None
        answer, rule = extract(response, rules)
        if answer is None or float(_scorer(name)(answer, entry)) < 1.0:
            return WRONG
        return CORRECT + (float(record.get("format_bonus", 0.0)) if rule == 0 else 0.0)

    reward.__name__ = f"{task}_reward"
    return reward


def parse_config(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs -> keyword arguments (values read as JSON when they parse, else text)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DatasetError(f"--config {pair!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def create(name: str, seed: int, size: int, config: dict[str, Any]) -> Any:
    """``rg.create_dataset`` with errors that name the dataset and the bad option."""
    rg = _rg()
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise DatasetError(
            f"unknown reasoning-gym dataset {name!r} (e.g. {', '.join(sorted(DATASETS)[:6])}, ...)"
        )
    try:
        return rg.create_dataset(name, seed=seed, size=size, **config)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise DatasetError(f"reasoning-gym {name}: bad --config ({exc})") from None


def prepare(
    name: str,
    out: Path,
    train: int,
    eval_size: int,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    format_bonus: float = 0.0,
) -> tuple[Path, Path, int]:
    """Write ``out/train.jsonl`` and ``out/eval.jsonl`` (``eval_size`` distinct questions, none
    in the train split; a ``DatasetError`` when the task has fewer); returns their paths and the
    eval entries written."""
    if train < 1 or eval_size < 1:
        raise DatasetError("--train and --eval must be at least 1")
    config = config or {}
    data = create(name, seed, train, config)
    train_rows = [data[i] for i in range(train)]
    seen = {row["question"] for row in train_rows}
    # the eval split: another seed, each question once and none of the train split's
    eval_rows: list[dict[str, Any]] = []
    size = eval_size * 3 + 50
    for attempt in range(4):
        pool = create(name, seed + 1_000_003 * (attempt + 1), size, config)
        for i in range(len(pool)):
            if pool[i]["question"] not in seen:
                seen.add(pool[i]["question"])
                eval_rows.append(pool[i])
        if len(eval_rows) >= eval_size:
            break
        size *= 4
    if len(eval_rows) < eval_size:
        raise DatasetError(
            f"reasoning-gym {name}: only {len(eval_rows)} distinct questions outside the "
            f"{train}-problem train split, not the {eval_size} asked for (lower --train or "
            "widen --config)"
        )
    eval_rows = eval_rows[:eval_size]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        path = out / f"{split}.jsonl"
        with path.open("w") as f:
            for row in rows:
                record = {"rg": name, "entry": row, "format_bonus": format_bonus}
                f.write(json.dumps({"prompt": row["question"], "answer": json.dumps(record)}))
                f.write("\n")
        paths.append(path)
    meta = {"dataset": name, "config": config, "seed": seed, "train": train, "eval": len(eval_rows)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return paths[0], paths[1], len(eval_rows)
