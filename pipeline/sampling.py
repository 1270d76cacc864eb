"""TreePO segment-tree sampling, independent of any inference engine.

``TreeSampler.expand`` grows one tree per prompt. Each segment step sends every active path of
every prompt to the engine in ONE ``SegmentGenerator.generate`` call (siblings adjacent, so a
prefix cache hits). Per prompt, with w = width, b = branching (TREEPO.md section 1):

* step 0 forks the prompt into its initial divergence d0 (fixed, or drawn from a range);
* after a step each new segment either ends the path (EOS, engine stop, response-length cap,
  depth cap, repetition) and becomes a leaf, or stays active;
* next step's request count is ``n = min(w - leaves, b * (active + ended))``, where ``ended``
  counts the paths that ended in the step just done: their b branches go to the survivors
  (the paper's budget transfer, section 2.2). ``leaves + active <= w`` makes ``n >= active``, so
  every active path continues. The n - active extra requests are spread uniformly (default) or by
  softmax(+/- score / temperature) of the last segment's mean log-prob or entropy;
* with ``answer_stop = "boxed"`` a segment that closes a ``\\boxed{...}`` answer ends its path
  (finish reason ``answer``);
* fallback: a prompt with no active path and fewer than w leaves forks b new paths from leaves
  that ended with an answer (``answer``, ``eos`` or an engine stop; never from depth-, length- or
  repetition-stopped leaves), each cut at a random segment boundary, the prompt itself included;
  with no such leaf it restarts from the prompt. Contexts are always rebuilt as prompt + the
  path's own tokens, so a fork can never splice onto a foreign prefix.

The engine side (vLLM) is in ``workers/``; this module never imports it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from pipeline.config import TreeConfig
from pipeline.messages import TreeRollout
from pipeline.rewards import last_boxed

ANSWER_REASONS = ("answer", "eos", "stop")
"""Finish reasons of paths that ended on their own: the only leaves fallback forks from."""


@dataclass(frozen=True)
class SegmentRequest:
    """One path's next segment: the full context (prompt + path tokens) and the token budget."""

    token_ids: list[int]
    max_tokens: int


@dataclass
class GeneratedSegment:
    """What the engine produced for one request.

    ``finished`` means the engine stopped on its own (EOS or a stop condition), not on
    ``max_tokens``. ``logprobs`` are the sampled tokens' log-probs under the behavior policy.
    ``entropies`` (optional) are per-token entropies, used only by entropy allocation.
    """

    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    policy_version: int = 0
    entropies: list[float] | None = None


@runtime_checkable
class SegmentGenerator(Protocol):
    """An engine that continues many contexts by one segment each, in one batched call."""

    async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
        """One output per request, in the same order."""
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
class _PromptState:
    """Growth state of one prompt's tree between segment steps."""

    tree: TreeRollout
    forks: list[tuple[int, int]] = field(default_factory=list)
    """(parent node or -1 for the prompt, number of children) to request next step."""
    active: list[int] = field(default_factory=list)
    score: dict[int, float] = field(default_factory=dict)
    """Allocation score of each active node (mean log-prob or entropy of its segment)."""
    lengths: dict[int, int] = field(default_factory=dict)
    """Response length (tokens) up to and including each node."""
    ended: int = 0
    """Paths that ended in the step just done (their branches go to the survivors)."""


class TreeSampler:
    """Grows TreePO segment trees with any ``SegmentGenerator``."""

    def __init__(
        self,
        generator: SegmentGenerator,
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
        """Grow one tree per prompt (same order), one engine call per segment step."""
        states = [_PromptState(TreeRollout(np.asarray(p, dtype=np.int32))) for p in prompts]
        for st in states:
            st.forks = [(-1, min(self._root_fanout(), self.config.width))]
        while True:
            batch = [(st, parent) for st in states for parent, k in st.forks for _ in range(k)]
            if not batch:
                break
            requests = [self._request(st, parent) for st, parent in batch]
            started = time.perf_counter()
            outputs = await self.generator.generate(requests)
            elapsed = time.perf_counter() - started
            if len(outputs) != len(requests):
                raise ValueError(
                    f"generator returned {len(outputs)} outputs for {len(requests)} requests"
                )
            self._account(batch, requests, outputs, elapsed)
            for st in states:
                st.active, st.ended = [], 0
            for (st, parent), req, out in zip(batch, requests, outputs):
                self._grow(st, parent, req, out)
            for st in states:
                st.forks = self._plan(st)
        for st in states:
            st.tree.recount()
        return [st.tree for st in states]

    # -- one step ------------------------------------------------------------------------------

    def _root_fanout(self) -> int:
        rng = self.config.initial_divergence_range
        if rng is None:
            return self.config.initial_divergence
        return self.rng.randint(rng[0], rng[1])

    def _request(self, st: _PromptState, parent: int) -> SegmentRequest:
        done = 0 if parent == -1 else st.lengths[parent]
        budget = min(self.config.segment_tokens, self.config.response_cap - done)
        tree = st.tree
        context = [*tree.prompt_token_ids.tolist(), *tree.response_tokens(parent).tolist()]
        return SegmentRequest(context, budget)

    def _account(
        self,
        batch: list[tuple[_PromptState, int]],
        requests: list[SegmentRequest],
        outputs: list[GeneratedSegment],
        elapsed: float,
    ) -> None:
        total = sum(len(o.token_ids) for o in outputs) or 1
        seen: set[int] = set()
        for (st, _), req, out in zip(batch, requests, outputs):
            s = st.tree.stats
            if id(st) not in seen:
                seen.add(id(st))
                s.engine_calls += 1
            s.prefill_tokens += len(req.token_ids)
            s.generation_seconds += elapsed * len(out.token_ids) / total

    def _grow(
        self, st: _PromptState, parent: int, req: SegmentRequest, out: GeneratedSegment
    ) -> None:
        cfg = self.config
        if len(out.token_ids) != len(out.logprobs):
            raise ValueError(
                f"segment has {len(out.token_ids)} tokens but {len(out.logprobs)} logprobs"
            )
        if len(out.token_ids) > req.max_tokens:
            raise ValueError(
                f"segment of {len(out.token_ids)} tokens exceeds max_tokens {req.max_tokens}"
            )
        tokens, logprobs = list(out.token_ids), list(out.logprobs)
        reason: str | None = None
        if cfg.eos_token_id is not None and cfg.eos_token_id in tokens:
            cut = tokens.index(cfg.eos_token_id) + 1  # keep the EOS, drop what follows it
            tokens, logprobs, reason = tokens[:cut], logprobs[:cut], "eos"
        elif out.finished or len(tokens) < req.max_tokens:
            reason = "stop"
        node = st.tree.add_node(parent, tokens, logprobs, out.policy_version)
        length = (0 if parent == -1 else st.lengths[parent]) + len(tokens)
        st.lengths[node] = length
        if reason is None and self._closes_answer(st.tree, node, tokens):
            reason = "answer"
        if reason is None:
            if st.tree.depth(node) >= cfg.max_depth:
                reason = "depth"
            elif length >= cfg.response_cap:
                reason = "length"
            elif cfg.repetition_ngram and repeats_tail(
                st.tree.response_tokens(node).tolist(), cfg.repetition_ngram, cfg.repetition_repeats
            ):
                reason = "repetition"
        if reason is not None:
            st.tree.add_leaf(node, reason)
            st.ended += 1
        else:
            st.active.append(node)
            st.score[node] = self._score(out, len(tokens))

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

    # -- planning the next step ----------------------------------------------------------------

    def _plan(self, st: _PromptState) -> list[tuple[int, int]]:
        cfg = self.config
        room = cfg.width - len(st.tree.leaves)
        if st.active:
            n = max(len(st.active), min(room, cfg.branching * (len(st.active) + st.ended)))
            return self._allocate(st, n)
        if room > 0 and cfg.fallback:
            return self._fallback(st, room)
        return []

    def _allocate(self, st: _PromptState, n: int) -> list[tuple[int, int]]:
        active = st.active
        counts = [1] * len(active)
        extra = n - len(active)
        if extra > 0:
            if self.config.allocation == "uniform":
                for i in range(len(active)):
                    counts[i] += extra // len(active)
                for i in self.rng.sample(range(len(active)), extra % len(active)):
                    counts[i] += 1
            else:
                sign = 1.0 if self.config.allocation.endswith("high") else -1.0
                t = self.config.allocation_temperature
                logits = [sign * st.score[a] / t for a in active]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                for i in self.rng.choices(range(len(active)), weights=weights, k=extra):
                    counts[i] += 1
        return [(a, c) for a, c in zip(active, counts)]

    def _fallback(self, st: _PromptState, room: int) -> list[tuple[int, int]]:
        """Fork b paths at a time from answered leaves, each cut at a random boundary on the
        window grid (depth 0 = the prompt), until ``room`` is covered; restart from the prompt
        when no leaf ended with an answer."""
        tree, cfg = st.tree, self.config
        m = cfg.window_segments
        sources = [leaf for leaf in tree.leaves if leaf.finish_reason in ANSWER_REASONS]
        if not sources:
            tree.stats.fallbacks += 1
            return [(-1, room)]
        self.rng.shuffle(sources)
        forks: dict[int, int] = {}
        i = 0
        while room > 0:
            leaf = sources[i % len(sources)]
            path = tree.path(leaf.node)
            depth = self.rng.choice(range(0, len(path), m))  # segments kept above the cut
            cut = path[depth - 1] if depth else -1
            k = min(cfg.branching, room)
            forks[cut] = forks.get(cut, 0) + k
            room -= k
            tree.stats.fallbacks += 1
            i += 1
        return list(forks.items())
