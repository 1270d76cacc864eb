"""Scripted path engines for pure algorithm tests (no real engine).

``ScriptedEngine`` implements ``PathGenerator`` the way a continuous-batching engine behaves: every
opened request decodes one token per tick (an event-loop turn), independently of the others, so
paths that start together reach their boundaries together and nothing waits for anything else.
Subclasses say what a segment holds (``segment``). It records every request opened, the reads of
each, the most requests running at once, and that no request is read after it ended or was
cancelled.

``ScriptedGenerator``: the first token of every segment is a fingerprint of the request's context
at that point (prompt + the path so far), so a test can check that each node was generated under
exactly prompt + its own path. The rest is random but seeded.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from dataclasses import dataclass, field

from pipeline.treepo.sampling import GeneratedSegment, PathRequest

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


class ScriptedPath:
    """One scripted request."""

    def __init__(self, engine: ScriptedEngine, request: PathRequest, index: int) -> None:
        self.engine = engine
        self.request = request
        self.index = index
        """Position among all requests the engine opened."""
        self.context = list(request.token_ids)
        self.left = request.max_tokens
        self.reads: list[int] = []
        """Sizes asked for, in order."""
        self.ended = False
        self.cancelled = False
        engine.running += 1
        engine.most_running = max(engine.most_running, engine.running)

    async def next(self, max_tokens: int) -> GeneratedSegment:
        assert not self.cancelled, "read after cancel"
        assert not self.ended, "read after the request ended"
        assert 0 < max_tokens <= self.left, (max_tokens, self.left)
        self.reads.append(max_tokens)
        out = self.engine.segment(self, max_tokens)
        for _ in range(max(1, len(out.token_ids)) * self.engine.ticks(self)):
            await asyncio.sleep(0)
        self.context += out.token_ids
        self.left -= len(out.token_ids)
        if out.finished or len(out.token_ids) < max_tokens or self.left == 0:
            self._end()
        return out

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.engine.running -= 1


class ScriptedEngine:
    """A ``PathGenerator`` of scripted requests (subclasses define ``segment``)."""

    def __init__(self) -> None:
        self.paths: list[ScriptedPath] = []
        self.running = 0
        self.most_running = 0

    @property
    def opened(self) -> list[PathRequest]:
        return [p.request for p in self.paths]

    def open(self, request: PathRequest) -> ScriptedPath:
        path = ScriptedPath(self, request, len(self.paths))
        self.paths.append(path)
        return path

    def ticks(self, path: ScriptedPath) -> int:
        """Event-loop turns per token of ``path`` (its speed)."""
        return 1

    def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
        raise NotImplementedError


@dataclass(eq=False)
class ScriptedGenerator(ScriptedEngine):
    """Segments of the asked size, except that with probability ``stop_p`` the request stops
    early (finished), with ``eos_p`` an EOS lands at a random position (possibly followed by
    junk tokens the sampler must drop), with ``short_p`` a shorter unfinished segment comes back,
    and with ``answer_p`` the segment spells a closed boxed answer (the engine does not stop)."""

    seed: int = 0
    stop_p: float = 0.0
    eos_p: float = 0.0
    short_p: float = 0.0
    answer_p: float = 0.0
    filler: int | None = None
    """Fixed token for the non-fingerprint positions (None: random)."""
    jitter: int = 0
    """Each request's speed: 1 + a seeded random number of extra ticks per token up to this."""
    speeds: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ScriptedEngine.__init__(self)
        self.rng = random.Random(self.seed)

    def ticks(self, path: ScriptedPath) -> int:
        if path.index not in self.speeds:
            self.speeds[path.index] = 1 + self.rng.randint(0, self.jitter)
        return self.speeds[path.index]

    def _token(self) -> int:
        return self.filler if self.filler is not None else self.rng.randrange(1, VOCAB)

    def segment(self, path: ScriptedPath, n: int) -> GeneratedSegment:
        toks = [fingerprint(path.context)] + [self._token() for _ in range(n - 1)]
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
