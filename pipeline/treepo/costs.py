"""Device-time accounting: what independent sampling of the same prompts would have cost, priced
with the sampler's own engine.

What tree sampling used is measured (the engine's busy seconds, step by step; see
``workers.engine.EngineMeter``). What independent sampling would have used cannot be measured in
the same run, so it is priced: every engine step is observed as (context tokens computed,
tokens decoded, seconds), and a non-negative least-squares fit over all steps gives::

    step seconds = a * prefill_tokens + b * decoded_tokens + c

(a: prefill cost per token, b: decode cost per token, c: fixed cost per engine step). The
independent counterfactual of one prompt (``independent_work``) is ``n`` samples in one
request, as vLLM runs ``SamplingParams(n=...)``: each sample computes the prompt (the samples
start in the same step, before any of them could be cached), decodes its own response (the
tree's estimate of an independent sample's mean length, ``TreeRollout.mean_leaf_length``), and
the group occupies the engine for as many steps as its longest sample, shared with the other
prompts in flight (``StepConcurrency``: as many as the trees growing at the average engine
step). ``bench/tree_vs_independent.py`` checks the prediction against a real independent run of
the same prompts on the same engine. On CPU machines these are CPU-seconds of
the engine; the formula is the same.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Work:
    """Engine work in the units of the cost model."""

    prefill_tokens: float
    decoded_tokens: float
    steps: float

    def vector(self) -> tuple[float, float, float]:
        return (self.prefill_tokens, self.decoded_tokens, self.steps)

    def __add__(self, other: Work) -> Work:
        return Work(
            self.prefill_tokens + other.prefill_tokens,
            self.decoded_tokens + other.decoded_tokens,
            self.steps + other.steps,
        )


class CostModel:
    """Least-squares fit of seconds = a*prefill + b*decode + c*steps with non-negative
    coefficients, from running sums (observing is O(1); the fit is done when asked)."""

    def __init__(self) -> None:
        self.ata = np.zeros((3, 3))
        self.aty = np.zeros(3)
        self.observed = 0
        self._coef: tuple[float, float, float] | None = (0.0, 0.0, 0.0)

    def observe(self, work: Work, seconds: float) -> None:
        x = np.asarray(work.vector(), dtype=float)
        self.ata += np.outer(x, x)
        self.aty += x * seconds
        self.observed += 1
        self._coef = None

    @property
    def coef(self) -> tuple[float, float, float]:
        if self._coef is None:
            self._coef = self._fit()
        return self._coef

    def _fit(self) -> tuple[float, float, float]:
        """The best fit over every subset of the columns whose solution is non-negative (the
        non-negative least-squares optimum has this form)."""
        best: tuple[float, np.ndarray, tuple[int, ...]] | None = None
        for size in (3, 2, 1):
            for cols in itertools.combinations(range(3), size):
                idx = np.asarray(cols)
                sub = self.ata[np.ix_(idx, idx)]
                if abs(np.linalg.det(sub)) < 1e-12 * max(1.0, float(np.abs(sub).max()) ** size):
                    continue
                sol = np.linalg.solve(sub, self.aty[idx])
                if (sol < 0).any():
                    continue
                # residual up to the constant y'y: -2 sol.(A'y) + sol'(A'A)sol
                resid = float(-2 * sol @ self.aty[idx] + sol @ sub @ sol)
                if best is None or resid < best[0] - 1e-15:
                    best = (resid, sol, cols)
        coef = [0.0, 0.0, 0.0]
        if best is not None:
            for s, c in zip(best[1], best[2]):
                coef[c] = float(s)
        return (coef[0], coef[1], coef[2])

    def estimate(self, work: Work) -> float:
        return sum(c * x for c, x in zip(self.coef, work.vector()))

    @property
    def decode_tokens_per_second(self) -> float:
        return 1.0 / self.coef[1] if self.coef[1] > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return 1.0 / self.coef[0] if self.coef[0] > 0 else 0.0


class StepConcurrency:
    """How many trees were growing at each engine step, averaged over the steps that had any.

    Every engine step advances each growing tree by one step, so the sum over steps of the
    trees growing equals the sum over trees of the engine steps each lived: the step-weighted
    mean is the number of neighbours a tree's step was shared with. An independent group would
    share its steps the same way, so its ``longest`` steps cost ``longest / mean`` engine steps.
    (A mean over wall time is biased: it also counts trees being scored, published, or waiting
    for the sampler's loop while the engine has nothing to do.) Not thread-safe: callers hold
    their own lock, or call everything from the engine's thread."""

    def __init__(self) -> None:
        self.growing = 0
        self.tree_steps = 0
        self.steps = 0

    def started(self) -> None:
        self.growing += 1

    def ended(self) -> None:
        self.growing -= 1

    def step(self) -> None:
        if self.growing > 0:
            self.tree_steps += self.growing
            self.steps += 1

    @property
    def mean(self) -> float:
        return self.tree_steps / self.steps if self.steps else float(max(1, self.growing))


def independent_work(
    prompt_length: int, samples: int, mean_length: float, longest: int, concurrency: float
) -> Work:
    """Work of ``samples`` independent samples of one prompt in one ``n = samples`` request:
    the prompt computed by each sample, ``samples * mean_length`` tokens decoded, and the
    request's ``longest`` steps shared with the other ``concurrency`` prompts in flight."""
    return Work(
        float(samples * prompt_length),
        float(samples * mean_length),
        float(longest) / max(1.0, concurrency),
    )
