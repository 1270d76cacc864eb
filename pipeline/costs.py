"""Device-time accounting: what tree sampling cost, and what independent sampling of the same
leaves would have cost, measured with the sampler's own engine.

Each engine call is observed as (prefill tokens not served from the prefix cache, decoded
tokens, engine steps = the longest output of the call, seconds). A non-negative least-squares
fit over recent calls gives the cost model::

    seconds = a * prefill_tokens + b * decoded_tokens + c * engine_steps

(a: prefill cost per token, b: decode cost per token, c: fixed cost per forward pass). A tree
batch is charged model(its calls); independent sampling of the same leaves is charged
model(each prompt prefilled once, every leaf's full response decoded, steps = the longest leaf),
as one ``n = width`` generate call would do. GPU-seconds saved = independent - tree (negative
when trees cost more). On CPU machines these are CPU-seconds of the engine; the formula is the
same.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    """Engine work in the units of the cost model."""

    prefill_tokens: float
    decoded_tokens: float
    steps: float

    def vector(self) -> tuple[float, float, float]:
        return (self.prefill_tokens, self.decoded_tokens, self.steps)


def _solve(
    rows: Sequence[tuple[float, ...]], ys: Sequence[float], cols: tuple[int, ...]
) -> list[float] | None:
    """Least squares on the chosen columns (normal equations, Gaussian elimination)."""
    k = len(cols)
    ata = [[sum(r[cols[i]] * r[cols[j]] for r in rows) for j in range(k)] for i in range(k)]
    aty = [sum(r[cols[i]] * y for r, y in zip(rows, ys)) for i in range(k)]
    m = [ata[i] + [aty[i]] for i in range(k)]
    for i in range(k):
        pivot = max(range(i, k), key=lambda r: abs(m[r][i]))
        if abs(m[pivot][i]) < 1e-12:
            return None
        m[i], m[pivot] = m[pivot], m[i]
        for r in range(k):
            if r != i:
                f = m[r][i] / m[i][i]
                m[r] = [x - f * y for x, y in zip(m[r], m[i])]
    return [m[i][k] / m[i][i] for i in range(k)]


class CostModel:
    """Online fit of seconds = a*prefill + b*decode + c*steps over the last ``window`` calls."""

    def __init__(self, window: int = 512) -> None:
        self.rows: deque[tuple[float, float, float]] = deque(maxlen=window)
        self.seconds: deque[float] = deque(maxlen=window)
        self.coef: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def observe(self, work: Work, seconds: float) -> None:
        self.rows.append(work.vector())
        self.seconds.append(seconds)
        self._fit()

    def _fit(self) -> None:
        rows, ys = list(self.rows), list(self.seconds)
        best: tuple[float, list[float], tuple[int, ...]] | None = None
        for size in (3, 2, 1):
            for cols in itertools.combinations(range(3), size):
                sol = _solve(rows, ys, cols)
                if sol is None or any(x < 0 for x in sol):
                    continue
                resid = sum(
                    (y - sum(s * r[c] for s, c in zip(sol, cols))) ** 2 for r, y in zip(rows, ys)
                )
                if best is None or resid < best[0] - 1e-15:
                    best = (resid, sol, cols)
        if best is not None:
            coef = [0.0, 0.0, 0.0]
            for s, c in zip(best[1], best[2]):
                coef[c] = s
            self.coef = (coef[0], coef[1], coef[2])

    def estimate(self, work: Work) -> float:
        return sum(c * x for c, x in zip(self.coef, work.vector()))

    @property
    def decode_tokens_per_second(self) -> float:
        return 1.0 / self.coef[1] if self.coef[1] > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return 1.0 / self.coef[0] if self.coef[0] > 0 else 0.0


def independent_work(prompt_lengths: list[int], leaf_lengths: list[list[int]]) -> Work:
    """Work of sampling the same leaves independently: one ``n = len(leaves)`` request per prompt
    (the prompt prefilled once), every leaf decoded in full, all prompts in one batch."""
    longest = max((n for leaves in leaf_lengths for n in leaves), default=0)
    return Work(
        float(sum(prompt_lengths)), float(sum(sum(x) for x in leaf_lengths)), float(longest)
    )
