"""Reward functions for verifiable tasks.

``math_reward`` checks the last ``\\boxed{...}`` of a response against a reference answer with
math-verify (symbolic equivalence), under a time limit per call, and never raises. math-verify
(and sympy behind it) are imported on first use, so importing this module stays light.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CORRECT = 1.0
WRONG = -1.0


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None when there is none or it
    is not closed."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            return None  # unclosed: the response was cut off
        start = text.rfind("\\boxed", 0, start)
    return None


def _equivalent(candidate: str, reference: str, timeout_s: int | None) -> bool:
    from math_verify import parse, verify

    # math-verify warns on every call made without its signal timeout (we enforce our own)
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    gold = parse(f"${reference}$", parsing_timeout=timeout_s)
    pred = parse(f"\\boxed{{{candidate}}}", parsing_timeout=timeout_s)
    if not gold or not pred:
        return candidate.strip() == reference.strip()
    return bool(verify(gold, pred, timeout_seconds=timeout_s))


def _with_deadline(fn: Callable[[], bool], timeout_s: float) -> bool:
    """Run ``fn`` in a daemon thread and give up after ``timeout_s`` (used off the main thread,
    where math-verify's signal-based timeout cannot work)."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception as exc:
            log.debug("math_reward check failed: %s", exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(result and result[0])


def math_reward(response: str, reference: str, timeout_s: int = 5) -> float:
    """+1.0 when the last ``\\boxed{...}`` in ``response`` is mathematically equivalent to
    ``reference``, else -1.0 (also for no box, a parse failure or a timeout). Never raises."""
    try:
        candidate = last_boxed(response)
        if not candidate or not candidate.strip() or not isinstance(reference, str):
            return WRONG
        if threading.current_thread() is threading.main_thread():
            ok = _equivalent(candidate, reference, timeout_s)
        else:
            ok = _with_deadline(lambda: _equivalent(candidate, reference, None), timeout_s)
        return CORRECT if ok else WRONG
    except Exception as exc:  # any parser failure is a wrong answer, never a crash
        log.debug("math_reward failed on %r: %s", response[:80], exc)
        return WRONG
