"""A scripted segment generator for pure algorithm tests (no engine).

The first token of every segment is a fingerprint of the request's context, so a test can check
that each node was generated under exactly prompt + its own path. The rest is random but seeded.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

from pipeline.sampling import GeneratedSegment, SegmentRequest

EOS = 0
VOCAB = 1_000_003
BOX_OPEN, BOX_CLOSE = VOCAB, VOCAB + 1
"""Tokens that decode to ``\\boxed{`` and ``}`` (outside the fingerprint range)."""


def decode(ids: list[int]) -> str:
    """Text of scripted tokens: the answer tokens spell a boxed answer, the rest is ``x``."""
    return "".join({BOX_OPEN: "\\boxed{", BOX_CLOSE: "}"}.get(t, "x") for t in ids)


def fingerprint(context: list[int]) -> int:
    """A token id in [2, VOCAB) determined by the context (0 is EOS, 1 is the filler token)."""
    return 2 + zlib.crc32(repr(context).encode()) % (VOCAB - 2)


@dataclass
class ScriptedGenerator:
    """Segments of ``max_tokens`` tokens, except that with probability ``stop_p`` the engine
    stops early (finished), with ``eos_p`` an EOS lands at a random position (possibly followed
    by junk tokens the sampler must drop), and with ``short_p`` a shorter unfinished segment
    comes back."""

    seed: int = 0
    stop_p: float = 0.0
    eos_p: float = 0.0
    short_p: float = 0.0
    answer_p: float = 0.0
    """Probability that a segment spells a closed boxed answer (the engine does not stop)."""
    filler: int | None = None
    """Fixed token for the non-fingerprint positions (None: random)."""
    calls: list[list[SegmentRequest]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
        self.calls.append(list(requests))
        return [self._one(r) for r in requests]

    def _token(self) -> int:
        return self.filler if self.filler is not None else self.rng.randrange(1, VOCAB)

    def _one(self, req: SegmentRequest) -> GeneratedSegment:
        n = req.max_tokens
        toks = [fingerprint(req.token_ids)] + [self._token() for _ in range(n - 1)]
        toks = toks[:n]
        finished = False
        roll = self.rng.random()
        if roll < self.stop_p:
            toks, finished = toks[: self.rng.randint(1, n)], True
        elif roll < self.stop_p + self.eos_p:
            pos = self.rng.randrange(n)
            toks[pos] = EOS
            finished = True
        elif roll < self.stop_p + self.eos_p + self.short_p and n > 1:
            toks = toks[: self.rng.randint(1, n - 1)]
        elif roll < self.stop_p + self.eos_p + self.short_p + self.answer_p and n >= 3:
            pos = self.rng.randrange(1, n - 1)
            toks[pos : pos + 2] = [BOX_OPEN, BOX_CLOSE]
        lps = [-self.rng.uniform(0.01, 3.0) for _ in toks]
        return GeneratedSegment(toks, lps, finished)
