"""What the learner does with each tree it receives: the verdict of ``learner.rules.triage``
applied (ready for a batch, duplicate, dropped and counted, dead-lettered), and the bookkeeping
of the stream entries it resolved (acknowledged at the next checkpoint)."""

from __future__ import annotations

import logging
import time
from collections import Counter

from learner.admission import Admission
from learner.metrics import LearnerMetrics
from learner.rules import Verdict, staleness, triage
from learner.state import LearnerState, Resolved
from pipeline.config import LearnerSettings
from pipeline.wire.messages import TreeRollout
from pipeline.wire.streams import TREE_GROUP, Delivery, Streams

log = logging.getLogger("learner.process")


class Intake:
    def __init__(
        self,
        settings: LearnerSettings,
        streams: Streams,
        metrics: LearnerMetrics,
        admission: Admission,
    ) -> None:
        self.settings = settings
        self.streams = streams
        self.metrics = metrics
        self.admission = admission
        self.ready: list[tuple[Delivery, TreeRollout]] = []
        """Trees waiting for a full batch, in arrival order."""
        self.resolved_entries: list[str] = []
        """Tree entries resolved since the last checkpoint (acknowledged after it)."""
        self.received_leaves: list[float] = []
        """Leaf rewards of every tree received since the last step, dropped ones included: an
        unfiltered view of what the samplers' policy scores (the trained batch is filtered)."""
        self.drops = DropLog(settings.learner.batch_prompts)

    def waiting(self) -> set[str]:
        """Prompt ids whose tree arrived and waits for a batch."""
        return {t.prompt_id for _, t in self.ready}

    async def take(self, batch: list[Delivery], state: LearnerState, since: Resolved) -> None:
        """Sort consumed trees into ready, duplicate, dropped (each counted) or dead-lettered."""
        for d in batch:
            tree: TreeRollout = d.message  # type: ignore[assignment]  # the transport checked
            self.metrics.trees_consumed.inc()
            state.tokens_received += tree.stats.decoded_tokens
            verdict = triage(
                tree,
                state.ledger.status(tree.prompt_id),
                state.cursor,
                state.trained,
                self.waiting(),
                state.step,
                self.settings.run.max_staleness,
                self.settings.learner.dynamic_sampling,
            )
            if verdict in ("stale", "no_signal", "ready"):
                self.received_leaves.extend(leaf.reward for leaf in tree.leaves)
            await self._apply(verdict, d, tree, state, since)
            if verdict in ("stale", "no_signal"):
                self.drops.add(verdict)
        self.drops.maybe_log(len(self.ready))

    async def _apply(
        self, verdict: Verdict, d: Delivery, tree: TreeRollout, state: LearnerState, since: Resolved
    ) -> None:
        if verdict == "ready":
            self.ready.append((d, tree))
        elif verdict in ("duplicate", "before_restart"):
            if verdict == "before_restart":  # its position will be admitted and sampled again
                log.info("tree %s is for a prompt admitted before a restart", tree.tree_id)
            self.metrics.trees_duplicate.inc()
            self.resolved_entries.append(d.entry_id)
        elif verdict == "unknown":
            detail = f"tree {tree.tree_id} for prompt {tree.prompt_id}, never admitted"
            await self.streams.reject(d, TREE_GROUP, "unknown_prompt", detail)
        elif verdict == "sampling":  # a sampler of another build or setting: not trainable
            detail = f"tree {tree.tree_id} sampled with top_p {tree.top_p} < 1"
            # the prompt stays outstanding: once overdue it is admitted again (and abandoned
            # after max_admissions), so a correctly configured sampler can still serve it
            await self.streams.reject(d, TREE_GROUP, "sampling", detail)
        elif verdict == "stale":
            await self._drop_stale(d, tree, state, since)
        else:  # no_signal
            state.dropped_no_signal += 1
            self.metrics.trees_dropped_no_signal.inc()
            self.resolved_entries.append(d.entry_id)
            state.ledger.finish(tree.prompt_id, "no_signal")
            since.no_signal.append(tree.tree_id)

    async def _drop_stale(
        self, d: Delivery, tree: TreeRollout, state: LearnerState, since: Resolved
    ) -> None:
        state.dropped_stale += 1
        self.metrics.trees_dropped_stale.inc()
        self.resolved_entries.append(d.entry_id)
        if not self.settings.learner.readmit_stale:
            self.admission.abandon(state, since, tree.prompt_id, "its tree was stale")
        else:
            await self.admission.readmit(state, since, tree.prompt_id, stale=True)

    async def drop_now_stale(self, state: LearnerState, since: Resolved) -> None:
        """Trees wait in ``ready`` while steps go on: drop those that became older than
        ``max_staleness`` versions, so no trained tree is (docs/algorithm.md)."""
        fresh = []
        for d, tree in self.ready:
            if staleness(tree, state.step) > self.settings.run.max_staleness:
                await self._drop_stale(d, tree, state, since)
            else:
                fresh.append((d, tree))
        self.ready = fresh

    def next_batch(self, n: int) -> list[tuple[Delivery, TreeRollout]]:
        """The first ``n`` ready trees, out of ``ready``."""
        taken, self.ready = self.ready[:n], self.ready[n:]
        return taken

    def trained(self, taken: list[tuple[Delivery, TreeRollout]], state: LearnerState) -> None:
        """Record an update made with ``taken`` (called after it; a failed update leaves them
        unresolved, so they come back after a restart)."""
        self.drops.reset()
        for d, t in taken:
            state.trained.add(t.tree_id)
            state.ledger.finish(t.prompt_id, "trained")
            self.resolved_entries.append(d.entry_id)

    def leaves_received(self) -> list[float]:
        """The leaf rewards received since the last call (and the reset)."""
        leaves, self.received_leaves = self.received_leaves, []
        return leaves


DROP_REASONS = {
    "no_signal": "no signal: every leaf had the same reward",
    "stale": "stale: sampled too many versions ago",
}


class DropLog:
    """Trees dropped while the learner waits for a batch: one summary line at most every
    ``every_s`` seconds (how many, why, since when), so a learner that trains nothing says why
    instead of staying silent. A step starts a new count (``reset``)."""

    def __init__(self, batch: int, every_s: float = 30.0) -> None:
        self.batch, self.every_s = batch, every_s
        self.counts: Counter[str] = Counter()
        self.since: float | None = None
        self.logged_at = time.monotonic()

    def add(self, reason: str) -> None:
        if self.since is None:
            self.since = time.time()
        self.counts[reason] += 1

    def reset(self) -> None:
        self.counts.clear()
        self.since = None

    def line(self, ready: int) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self.since or time.time()))
        reasons = "; ".join(f"{n} {DROP_REASONS.get(k, k)}" for k, n in self.counts.most_common())
        return (
            f"waiting for trees: {sum(self.counts.values())} dropped since {since} ({reasons}); "
            f"{ready} of {self.batch} ready for the next step"
        )

    def maybe_log(self, ready: int) -> None:
        now = time.monotonic()
        if self.counts and now - self.logged_at >= self.every_s:
            log.warning(self.line(ready))
            self.logged_at = now
