"""math_reward: the last boxed answer, symbolic equivalence, never raising."""

from __future__ import annotations

import re
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.treepo.rewards import last_boxed, math_reward


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("so the answer is \\boxed{42}", "42", 1.0),
        ("\\boxed{41}", "42", -1.0),
        ("42", "42", -1.0),  # no box, no credit
        ("first \\boxed{1} then \\boxed{42}", "42", 1.0),  # the last box counts
        ("first \\boxed{42} then \\boxed{1}", "42", -1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("\\boxed{42", "42", -1.0),  # cut off
        ("\\boxed{}", "", -1.0),
    ],
)
def test_math_reward(response: str, reference: str, expected: float) -> None:
    assert math_reward(response, reference) == expected


def test_last_boxed_balances_braces() -> None:
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed {7}") == "7"
    assert last_boxed("\\boxed{1} \\boxed{") is None  # the last box is cut off
    assert last_boxed("nothing") is None


def test_works_off_the_main_thread() -> None:
    out: list[float] = []
    t = threading.Thread(
        target=lambda: out.extend([math_reward("\\boxed{3}", "3"), math_reward("\\boxed{4}", "3")])
    )
    t.start()
    t.join(30)
    assert out == [1.0, -1.0]


@given(st.text(max_size=200), st.text(max_size=20))
@settings(max_examples=100, deadline=None)
def test_never_raises(response: str, reference: str) -> None:
    assert math_reward("\\boxed{" + response, reference) in (1.0, -1.0)
    assert math_reward(response, reference) in (1.0, -1.0)


def length_reward(response: str, reference: str) -> float:
    """A user's reward function (imported by path in the test below)."""
    return 1.0 if len(response) <= int(reference) else -1.0


def two_many_args(response: str, reference: str, extra: str) -> float:
    return 0.0


def test_reward_functions_plug_in_by_import_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.config import LearnerOptions, LearnerSettings
    from pipeline.errors import ConfigError
    from pipeline.treepo.tasks import reward_fn

    fn = reward_fn("tests.test_rewards:length_reward")
    assert fn("abc", "3") == 1.0 and fn("abcd", "3") == -1.0
    for task, why in [
        ("tests.no_such_module:f", "cannot import 'tests.no_such_module'"),
        ("tests.test_rewards:nope", "has no 'nope'"),
        ("tests.test_rewards:two_many_args", "must be callable as f(response: str, reference"),
        (
            "lengthy",
            "use one of ['arith', 'math', 'rg', 'rg_answer_is', 'rg_boxed', 'rg_last_number'] or an import path",
        ),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            reward_fn(task)
    # settings refuse what cannot be a reward name; the learner names the setting at start,
    # before DeepSpeed, for a path that does not import
    with pytest.raises(ValueError, match="task"):
        LearnerOptions(task="not a path")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    from learner.admission import load_problems

    opts = LearnerOptions(dataset=str(data), task="tests.test_rewards:nope")
    with pytest.raises(ConfigError, match=r"TREEPO_LEARNER__TASK: reward .* has no 'nope'"):
        load_problems(LearnerSettings(learner=opts))
    opts = LearnerOptions(dataset=str(data), task="tests.test_rewards:length_reward")
    assert load_problems(LearnerSettings(learner=opts))[0].task.endswith(":length_reward")
