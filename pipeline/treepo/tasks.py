"""Tasks and datasets: the built-in arithmetic-chain task and local datasets (JSONL, Parquet,
or a Hugging Face ``save_to_disk`` directory).

A ``Problem`` is a prompt text, a reference answer and a reward function name. The built-in
task ``arith`` asks for the sum of a few numbers, written as one intermediate step per addition
and a final boxed answer::

    prompt:   12+34+7=
    response: 12+34=46;46+7=53;\\boxed{53}

Its checker (``arith_reward``) reads the last boxed number; ``math`` uses ``math_reward``. Real
datasets are local files; a row missing a field is an error naming the file, row and field.
Tokenization is not done here (see ``pipeline.tokenizer``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DatasetError
from pipeline.treepo.gym import EXTRACTORS, make_reward
from pipeline.treepo.rewards import CORRECT, WRONG, last_boxed, math_reward

BOX_OPEN = "\\boxed{"


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    task: str = "arith"
    """Reward function name: ``arith``, ``math``, a reasoning-gym rule (``rg``...) or an import
    path (``reward_fn``)."""


@dataclass(frozen=True)
class ArithTask:
    """Seeded generator of arithmetic chains. Train and held-out splits are disjoint: a problem
    belongs to the held-out split iff a hash of its operands falls in the held-out bucket."""

    terms: int = 3
    max_operand: int = 99
    heldout_buckets: int = 10
    """One bucket of this many is held out (10% of the problem space)."""

    def _is_heldout(self, operands: tuple[int, ...]) -> bool:
        h = 0
        for x in operands:
            h = (h * 1_000_003 + x) % 2_147_483_647
        return h % self.heldout_buckets == 0

    def problem(self, operands: tuple[int, ...]) -> Problem:
        return Problem("+".join(map(str, operands)) + "=", str(sum(operands)), "arith")

    def solution(self, operands: tuple[int, ...]) -> str:
        """The reference response: one step per addition, then the boxed total."""
        steps, acc = [], operands[0]
        for x in operands[1:]:
            steps.append(f"{acc}+{x}={acc + x};")
            acc += x
        return "".join(steps) + BOX_OPEN + str(acc) + "}"

    def sample(self, split: str, seed: int) -> Iterator[tuple[int, ...]]:
        """Endless operand tuples of ``split`` ("train" or "heldout"), deterministic in seed."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
        rng = random.Random(f"arith-{split}-{seed}")
        want_heldout = split == "heldout"
        while True:
            ops = tuple(rng.randint(1, self.max_operand) for _ in range(self.terms))
            if self._is_heldout(ops) == want_heldout:
                yield ops

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        it = self.sample(split, seed)
        return [self.problem(next(it)) for _ in range(n)]


def arith_reward(response: str, reference: str) -> float:
    """+1 when the last boxed value equals the reference integer exactly, else -1."""
    boxed = last_boxed(response)
    return CORRECT if boxed is not None and boxed.strip() == reference.strip() else WRONG


REWARDS: dict[str, Callable[[str, str], float]] = {
    "arith": arith_reward,
    "math": math_reward,
    **{name: make_reward(name) for name in EXTRACTORS},
}
"""Built-in rewards: the toy task, math answers, and reasoning-gym entries (``pipeline.treepo.gym``)."""


_IMPORTED: dict[str, Callable[[str, str], float]] = {}


def reward_fn(task: str) -> Callable[[str, str], float]:
    """The reward function of ``task``: a built-in name (``arith``, ``math``) or an import path
    ``package.module:function`` of a function ``(response text, reference answer) -> float``
    importable by every process (learner and samplers). Raises ``ValueError`` naming what is
    wrong."""
    if task in REWARDS:
        return REWARDS[task]
    if task in _IMPORTED:
        return _IMPORTED[task]
    module, sep, name = task.partition(":")
    if not sep or not module or not name:
        raise ValueError(
            f"unknown reward task {task!r}: use one of {sorted(REWARDS)} or an import path "
            "'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ValueError(f"reward {task!r}: cannot import {module!r} ({exc})") from None
    except AttributeError:
        raise ValueError(f"reward {task!r}: module {module!r} has no {name!r}") from None
    try:
        inspect.signature(fn).bind("response", "reference")
    except TypeError:
        raise ValueError(
            f"reward {task!r}: must be callable as f(response: str, reference: str) -> float"
        ) from None
    _IMPORTED[task] = fn
    return fn  # type: ignore[no-any-return]


def load_dataset(
    path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer", task: str = "math"
) -> list[Problem]:
    """Read a local JSONL or Parquet file, or a Hugging Face ``datasets`` directory written by
    ``save_to_disk``, into problems. Each row needs a non-empty string (or number) in
    ``prompt_field`` and ``answer_field``; any other row is an error naming the file, the
    (1-based) row and the field."""
    path = Path(path)
    if not path.is_file() and not _is_saved_dataset(path):
        raise DatasetError(
            f"{path}: no such file"
            if not path.is_dir()
            else f"{path}: a directory but not a saved dataset (no dataset_info.json / state.json)"
        )
    reward_fn(task)
    rows = _read_rows(path)
    out = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
        values = []
        for name in (prompt_field, answer_field):
            value = row.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(f"{path}: row {i}: field {name!r} is missing or empty")
            values.append(value)
        out.append(Problem(values[0], values[1], task))
    if not out:
        raise DatasetError(f"{path}: no rows")
    return out


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def _read_saved(path: Path) -> list[tuple[int, object]]:
    """Rows of a ``save_to_disk`` directory (a ``DatasetDict``: its ``train`` split)."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"{path}: reading a saved Hugging Face dataset needs the datasets package "
            "(pip install 'treepo[data]')"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DatasetError(f"{path}: not a readable saved dataset ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(f"{path}: a dataset dict without a 'train' split ({list(loaded)})")
        loaded = loaded["train"]
    return list(enumerate(loaded.to_list(), start=1))


def _read_rows(path: Path) -> list[tuple[int, object]]:
    """(row number, row) pairs; for JSONL the row number is the line number."""
    if _is_saved_dataset(path):
        return _read_saved(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from None
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    rows: list[tuple[int, object]] = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: row {i}: not valid JSON ({exc.msg})") from None
    return rows


GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$")


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution (the text after ``####``, thousands separators
    removed): ``"... #### 1,072"`` -> ``"1072"``."""
    match = GSM8K_ANSWER.search(solution.strip())
    if match is None:
        raise DatasetError(f"no '#### answer' line in {solution[-60:]!r}")
    return match.group(1).replace(",", "").strip()


def prepare_gsm8k(source: str | Path, out: str | Path) -> int:
    """Convert the standard GSM8K layout (JSONL or Parquet rows ``{question, answer}`` whose
    answer ends ``#### <number>``) into this project's JSONL (``{prompt, answer}``); returns the
    rows written. A bad row is a ``DatasetError`` naming file and row."""
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise DatasetError(f"{source}: no such file")
    lines = []
    for i, row in _read_rows(source):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DatasetError(f"{source}: row {i}: field 'question' is missing or not text")
        try:
            answer = gsm8k_answer(str(row.get("answer", "")))
        except DatasetError as exc:
            raise DatasetError(f"{source}: row {i}: field 'answer': {exc}") from None
        lines.append(json.dumps({"prompt": row["question"], "answer": answer}))
    if not lines:
        raise DatasetError(f"{source}: no rows")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return len(lines)
