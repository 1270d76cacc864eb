"""TreePO segment-tree sampling without barriers, independent of any inference engine.

Every path of a tree is one running engine request (``PathGenerator.open``) that the sampler
reads one segment at a time (``PathStream.next``). Nothing waits for anything else: when a path
reaches a segment boundary its children are decided at once, from the tree's state at that
moment. The path's own request goes on as one child (its KV cache stays in place) and the other
children are new requests whose context is prompt + the path so far. Trees do not wait for each
other either: ``TreeSampler.grow`` grows one tree and many run concurrently on one engine, whose
continuous batching mixes their levels. Per tree, with w = width and b = branching
(TREEPO.md section 1):

* the prompt is forked into its initial divergence d0 (fixed, or drawn from a range);
* each new segment either ends the path (EOS, engine stop, response-length cap, depth cap,
  repetition, a closed ``\\boxed{}`` answer with ``answer_stop = "boxed"``) and makes it a leaf,
  or the path goes on;
* budget: paths of a tree that reach a boundary at the same moment (in the same engine step)
  are decided together, a moment later, without waiting for any other path. Each goes on (its
  request keeps running) and together they fork ``min(free, (b - 1) * k + share)`` new paths,
  where k is how many arrived, ``free = w - leaves - open paths`` (so leaves + open paths never
  exceed w), and ``share`` is their part of the branches that ended paths handed over (the
  paper's budget transfer: a path that ends leaves its b branches to the survivors). The new
  paths are spread over the k boundaries uniformly (default) or by softmax(+/- score /
  temperature) of the last segment's mean log-prob or entropy. This is the published code's
  level rule ``n = min(w - leaves, b * (active + ended))`` taken at each boundary as it happens
  instead of at a level barrier;
* fallback: when a tree has no open path and fewer than w leaves, it forks b new paths at a time
  from leaves that ended with an answer (``answer``, ``eos`` or an engine stop; never from depth-,
  length- or repetition-stopped leaves), each cut at a random segment boundary, the prompt
  itself included; with no such leaf it restarts from the prompt. Contexts are always rebuilt as
  prompt + the path's own tokens, so a fork can never splice onto a foreign prefix.

A tree's ``independent_tokens`` (``TreeRollout.recount``) is what as many independent samples
are expected to decode, from the tree's probability-weighted leaf lengths.

The engine side (vLLM) is in ``workers/``; this module never imports it.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from pipeline.config import TreeConfig
from pipeline.treepo.rewards import last_boxed
from pipeline.wire.messages import TreeRollout

ANSWER_REASONS = ("answer", "eos", "stop")
"""Finish reasons of paths that ended on their own: the only leaves fallback forks from."""


@dataclass(frozen=True)
class PathRequest:
    """A new path: its full context (prompt + the tokens of the path it forks from) and the
    most tokens it may decode from there (the rest of the response and depth budget)."""

    token_ids: list[int]
    max_tokens: int
    read_size: int = 1
    """The reader takes the tokens in pieces of this many (a segment): the engine may deliver
    them in batches of that size instead of one by one."""


@dataclass
class GeneratedSegment:
    """One segment of a path, as the engine produced it.

    ``finished`` means the request stopped on its own (EOS or a stop condition), not on its
    ``max_tokens``. ``logprobs`` are the sampled tokens' log-probs under the behavior policy.
    ``policy_version`` is the version of the segment's first token (a weight swap inside a
    segment makes its later tokens newer; their log-probs are exact either way).
    ``entropies`` (optional) are per-token entropies, used only by entropy allocation.
    """

    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    policy_version: int = 0
    entropies: list[float] | None = None


@runtime_checkable
class PathStream(Protocol):
    """One running engine request, read one segment at a time."""

    async def next(self, max_tokens: int) -> GeneratedSegment:
        """The request's next ``max_tokens`` tokens, or fewer when the request ended first."""
        ...

    def cancel(self) -> None:
        """End the request (the path ended or the tree was abandoned); safe to call twice."""
        ...


@runtime_checkable
class PathGenerator(Protocol):
    """An engine that runs many path requests at once (continuous batching)."""

    def open(self, request: PathRequest) -> PathStream:
        """Start generating from ``request.token_ids``."""
        ...


def repeats_tail(tokens: list[int], max_ngram: int, repeats: int) -> bool:
    """True when ``tokens`` ends with some n-gram (1 <= n <= max_ngram) repeated ``repeats``
    times in a row."""
    for n in range(1, max_ngram + 1):
        span = n * repeats
        if span > len(tokens):
            break
        gram = tokens[-n:]
        if tokens[-span:] == gram * repeats:
            return True
    return False


@dataclass
class _Growth:
    """One tree while it grows."""

    tree: TreeRollout
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    streams: list[PathStream] = field(default_factory=list)
    """Every request the tree opened (all cancelled when it ends: an idempotent no-op for the
    ones that ended already)."""
    open: int = 0
    """Paths with a running request."""
    credit: int = 0
    """Branches handed over by paths that ended, owed to the survivors."""
    lengths: dict[int, int] = field(default_factory=dict)
    """Response length (tokens) up to and including each node."""
    arrived: list[tuple[int, float]] = field(default_factory=list)
    """Boundaries waiting for their decision: (node, score of its segment)."""
    deciding: bool = False
    closed: bool = False
    """The tree is done (or abandoned): a late decision does nothing."""
    error: BaseException | None = None
    """What a decision raised (it runs outside the path tasks)."""
    started: float = field(default_factory=time.perf_counter)


def _retrieve(tasks: set[asyncio.Task[None]]) -> None:
    """Mark the errors of finished path tasks as seen. When the engine stops, every open path
    fails at once; the tree raises one error, and asyncio would log each of the others as
    'Task exception was never retrieved', with a traceback, at a normal shutdown."""
    for task in tasks:
        if not task.cancelled():
            task.exception()


class TreeSampler:
    """Grows TreePO segment trees with any ``PathGenerator``."""

    def __init__(
        self,
        generator: PathGenerator,
        config: TreeConfig,
        rng: random.Random | int | None = None,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        """``decode`` turns response tokens into text; ``answer_stop = "boxed"`` needs it."""
        if config.answer_stop != "none" and decode is None:
            raise ValueError(f"answer_stop {config.answer_stop!r} needs a decode function")
        self.generator = generator
        self.config = config
        self.rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        self.decode = decode

    async def expand(self, prompts: list[list[int]]) -> list[TreeRollout]:
        """Grow one tree per prompt (same order), all at once."""
        return list(await asyncio.gather(*(self.grow(p) for p in prompts)))

    async def grow(self, prompt: Sequence[int]) -> TreeRollout:
        """Grow one tree. Cancelling it cancels every request it has running."""
        g = _Growth(TreeRollout(np.asarray(prompt, dtype=np.int32)))
        try:
            for _ in range(min(self._root_fanout(), self.config.width)):
                self._spawn(g, -1)
            while g.tasks or g.arrived:
                if not g.tasks:  # the paths ran ahead of their boundaries' decision
                    self._decide(g)
                    if g.error is not None:
                        raise g.error
                else:
                    done, _ = await asyncio.wait(g.tasks, return_when=asyncio.FIRST_EXCEPTION)
                    g.tasks -= done
                    _retrieve(done)
                    if g.error is not None:
                        raise g.error
                    for task in done:
                        task.result()  # a path's error is the tree's error
        finally:
            g.closed = True
            for task in g.tasks:
                task.cancel()
            if g.tasks:
                await asyncio.wait(g.tasks)
                _retrieve(g.tasks)
            for stream in g.streams:  # also those whose task was cancelled before it ran
                stream.cancel()
        tree = g.tree
        tree.recount()
        tree.stats.generation_seconds = time.perf_counter() - g.started
        return tree

    # -- paths -------------------------------------------------------------------------------------

    def _root_fanout(self) -> int:
        rng = self.config.initial_divergence_range
        if rng is None:
            return self.config.initial_divergence
        return self.rng.randint(rng[0], rng[1])

    def _spawn(self, g: _Growth, parent: int) -> None:
        """Start a new path below ``parent`` (-1: the prompt) as its own request."""
        cfg, tree = self.config, g.tree
        done = 0 if parent == -1 else g.lengths[parent]
        depth = 0 if parent == -1 else tree.depth(parent)
        budget = min(cfg.response_cap - done, (cfg.max_depth - depth) * cfg.segment_tokens)
        context = [*tree.prompt_token_ids.tolist(), *tree.response_tokens(parent).tolist()]
        stream = self.generator.open(PathRequest(context, budget, cfg.segment_tokens))
        g.streams.append(stream)
        tree.stats.engine_calls += 1
        tree.stats.prefill_tokens += len(context)
        g.open += 1
        g.tasks.add(asyncio.ensure_future(self._follow(g, parent, stream)))

    async def _follow(self, g: _Growth, parent: int, stream: PathStream) -> None:
        """Read the path's segments until it ends; each boundary is handed to ``_decide``."""
        cfg = self.config
        try:
            while True:
                done = 0 if parent == -1 else g.lengths[parent]
                want = min(cfg.segment_tokens, cfg.response_cap - done)
                segment = await stream.next(want)
                node, ended = self._add(g, parent, want, segment)
                if ended:
                    break
                g.arrived.append((node, self._score(segment, len(g.tree.nodes[node].token_ids))))
                self._schedule(g)
                parent = node
        finally:
            stream.cancel()
        g.open -= 1
        if g.open:
            g.credit += cfg.branching
        elif not g.arrived:
            g.credit = 0
            self._refill(g)

    def _schedule(self, g: _Growth) -> None:
        if g.deciding:
            return
        g.deciding = True
        # the next turn of the loop: after the other boundaries of the same engine step (the
        # engine delivers a step's outputs together) and before the next step
        asyncio.get_running_loop().call_soon(self._decide, g)

    def _decide(self, g: _Growth) -> None:
        """Fork new paths at the boundaries that arrived together (see the module docstring)."""
        g.deciding = False
        arrived, g.arrived = g.arrived, []
        if not arrived or g.closed or g.error is not None:
            return
        try:
            self._fork(g, arrived)
        except Exception as exc:  # raised by grow(), which cancels the tree's paths
            g.error = exc
            for task in g.tasks:
                task.cancel()

    def _fork(self, g: _Growth, arrived: list[tuple[int, float]]) -> None:
        cfg = self.config
        free = cfg.width - len(g.tree.leaves) - g.open
        share = round(g.credit * len(arrived) / max(1, g.open))
        extra = max(0, min(free, (cfg.branching - 1) * len(arrived) + share))
        g.credit -= max(0, min(share, extra - (cfg.branching - 1) * len(arrived)))
        for (node, _), k in zip(arrived, self._allocate(arrived, extra)):
            for _ in range(k):
                self._spawn(g, node)
        if g.open == 0:
            self._refill(g)

    def _add(self, g: _Growth, parent: int, want: int, out: GeneratedSegment) -> tuple[int, bool]:
        """Record a segment as a node under ``parent``; returns (node, whether the path ended)."""
        cfg = self.config
        if len(out.token_ids) != len(out.logprobs):
            raise ValueError(
                f"segment has {len(out.token_ids)} tokens but {len(out.logprobs)} logprobs"
            )
        if len(out.token_ids) > want:
            raise ValueError(f"segment of {len(out.token_ids)} tokens exceeds max_tokens {want}")
        tokens, logprobs = list(out.token_ids), list(out.logprobs)
        reason: str | None = None
        if cfg.eos_token_id is not None and cfg.eos_token_id in tokens:
            cut = tokens.index(cfg.eos_token_id) + 1  # keep the EOS, drop what follows it
            tokens, logprobs, reason = tokens[:cut], logprobs[:cut], "eos"
        elif out.finished or len(tokens) < want:
            reason = "stop"
        tree = g.tree
        node = tree.add_node(parent, tokens, logprobs, out.policy_version)
        length = (0 if parent == -1 else g.lengths[parent]) + len(tokens)
        g.lengths[node] = length
        if reason is None:
            reason = self._end_reason(tree, node, tokens, length)
        if reason is not None:
            tree.add_leaf(node, reason)
        return node, reason is not None

    def _end_reason(
        self, tree: TreeRollout, node: int, tokens: list[int], length: int
    ) -> str | None:
        cfg = self.config
        if self._closes_answer(tree, node, tokens):
            return "answer"
        if tree.depth(node) >= cfg.max_depth:
            return "depth"
        if length >= cfg.response_cap:
            return "length"
        if cfg.repetition_ngram and repeats_tail(
            tree.response_tokens(node).tolist(), cfg.repetition_ngram, cfg.repetition_repeats
        ):
            return "repetition"
        return None

    def _closes_answer(self, tree: TreeRollout, node: int, segment: list[int]) -> bool:
        """The segment closes a boxed answer: it holds a ``}`` and the response now ends a
        ``\\boxed{...}`` (the opening may be in an earlier segment)."""
        if self.config.answer_stop != "boxed" or self.decode is None:
            return False
        if "}" not in self.decode(segment):
            return False
        return last_boxed(self.decode(tree.response_tokens(node).tolist())) is not None

    def _score(self, out: GeneratedSegment, n: int) -> float:
        if n == 0:
            return 0.0
        if self.config.allocation.startswith("entropy"):
            if out.entropies is not None:
                return sum(out.entropies[:n]) / n
            return -sum(out.logprobs[:n]) / n  # sampled-token surprisal estimates entropy
        return sum(out.logprobs[:n]) / n

    # -- budget ------------------------------------------------------------------------------------

    def _allocate(self, arrived: list[tuple[int, float]], extra: int) -> list[int]:
        """Spread ``extra`` new paths over the boundaries that arrived together."""
        counts = [0] * len(arrived)
        if extra <= 0:
            return counts
        if self.config.allocation == "uniform":
            for i in range(len(arrived)):
                counts[i] += extra // len(arrived)
            for i in self.rng.sample(range(len(arrived)), extra % len(arrived)):
                counts[i] += 1
            return counts
        sign = 1.0 if self.config.allocation.endswith("high") else -1.0
        t = self.config.allocation_temperature
        logits = [sign * score / t for _, score in arrived]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        for i in self.rng.choices(range(len(arrived)), weights=weights, k=extra):
            counts[i] += 1
        return counts

    def _refill(self, g: _Growth) -> None:
        """Fallback: fork b paths at a time from answered leaves, each cut at a random boundary
        on the window grid (depth 0 = the prompt), until the tree's room is covered; restart
        from the prompt when no leaf ended with an answer."""
        tree, cfg = g.tree, self.config
        room = cfg.width - len(tree.leaves)
        if room <= 0 or not cfg.fallback:
            return
        m = cfg.window_segments
        sources = [leaf for leaf in tree.leaves if leaf.finish_reason in ANSWER_REASONS]
        if not sources:
            tree.stats.fallbacks += 1
            for _ in range(room):
                self._spawn(g, -1)
            return
        self.rng.shuffle(sources)
        i = 0
        while room > 0:
            path = tree.path(sources[i % len(sources)].node)
            depth = self.rng.choice(range(0, len(path), m))  # segments kept above the cut
            cut = path[depth - 1] if depth else -1
            for _ in range(min(cfg.branching, room)):
                self._spawn(g, cut)
            room -= min(cfg.branching, room)
            tree.stats.fallbacks += 1
            i += 1
