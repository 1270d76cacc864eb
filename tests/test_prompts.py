"""Which prompts a sampler refuses before they reach its engine (each with its reason)."""

from __future__ import annotations

import pytest

from pipeline.wire.messages import PromptTask
from workers.prompts import prompt_problem


def task(n: int, name: str = "") -> PromptTask:
    return PromptTask("p-1", list(range(1, n + 1)), "3", 0, 0, name)


@pytest.mark.parametrize(
    ("n", "name", "reason"),
    [
        (10, "", None),  # the sampler's default task
        (10, "math", None),
        (10, "nope", "unknown_task"),
        (0, "", "too_long"),  # an empty prompt cannot be served either
        (64 - 32, "", None),  # exactly fills the context
        (64 - 32 + 1, "", "too_long"),
    ],
)
def test_prompt_problem(n: int, name: str, reason: str | None) -> None:
    problem = prompt_problem(task(n, name), "arith", context_tokens=64, response_cap=32)
    assert (problem[0] if problem else None) == reason
    if problem and reason == "too_long":
        assert f"of {n} tokens + response cap 32" in problem[1]
