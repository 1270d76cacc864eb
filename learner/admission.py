"""Prompt admission: what the learner puts on the prompts stream, and when it puts it again.

Admit while fewer than ``(max_staleness + 1) * batch_prompts`` prompts are outstanding in the
ledger (AReaL's bound on off-policyness); admit a prompt again when its tree is overdue and no
live sampler holds it, or when its tree came back stale; abandon it after ``max_admissions``.
Every decision is recorded in the ledger (``learner.ledger``), which the checkpoint keeps.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from learner.ledger import prompt_id
from learner.metrics import LearnerMetrics
from learner.state import LearnerState, Resolved
from pipeline.config import LearnerSettings
from pipeline.errors import ConfigError, DatasetError
from pipeline.treepo.tasks import ArithTask, Problem, load_dataset, reward_fn
from pipeline.wire.messages import PromptTask
from pipeline.wire.streams import PROMPT_GROUP, TREE_GROUP, Streams

log = logging.getLogger("learner.process")


def load_problems(settings: LearnerSettings) -> list[Problem]:
    """The training problems; a bad dataset or reward function is a ``ConfigError`` naming the
    setting."""
    opts = settings.learner
    if opts.dataset == "arith":
        return ArithTask().problems("train", 100_000, seed=settings.run.seed)
    try:
        reward_fn(opts.task)
    except ValueError as exc:
        raise ConfigError(f"TREEPO_LEARNER__TASK: {exc}") from None
    try:
        return load_dataset(opts.dataset, opts.prompt_field, opts.answer_field, opts.task)
    except DatasetError as exc:
        raise ConfigError(f"TREEPO_LEARNER__DATASET: {exc}") from None


class EpochOrder:
    """Which dataset item the admission cursor's position ``pos`` is: epoch ``pos // n`` visits
    all ``n`` items in an order drawn from (seed, epoch), or in file order unshuffled. A
    function of the position alone, so a resumed learner (its cursor is in the checkpoint)
    continues the same sequence and a re-admitted prompt is the same item."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, list(range(n))

    def item(self, pos: int) -> int:
        epoch, offset = divmod(pos, self.n)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._perm = list(range(self.n))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._perm)
            self._epoch = epoch
        return self._perm[offset]


def encode_prompt(
    tokenizer: Any,
    text: str,
    chat_template: bool,
    template: str = "{prompt}",
    system: str = "",
) -> list[int]:
    """Token ids of a prompt: ``text`` put into ``template`` (at ``{prompt}``; other braces,
    such as ``\\boxed{}``, stay as written), then through the tokenizer's chat template when
    asked, with ``system`` as the system message (transformers 5 returns a ``BatchEncoding``
    from ``apply_chat_template``, earlier versions a list)."""
    text = template.replace("{prompt}", text)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "TREEPO_LEARNER__CHAT_TEMPLATE=true but the model's tokenizer has no chat template"
            )
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        return [int(i) for i in ids]
    if system:
        raise ConfigError("TREEPO_LEARNER__SYSTEM_PROMPT needs TREEPO_LEARNER__CHAT_TEMPLATE=true")
    return [int(i) for i in tokenizer(text)["input_ids"]]


class Admission:
    def __init__(
        self,
        settings: LearnerSettings,
        streams: Streams,
        metrics: LearnerMetrics,
        tokenizer: Any,
        problems: list[Problem],
    ) -> None:
        self.settings = settings
        self.streams = streams
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.problems = problems
        self.order = EpochOrder(len(problems), settings.run.seed, settings.learner.shuffle)
        self.last_overdue_check = 0.0
        self._encode(0)  # chat template / system prompt problems fail at start, in one line

    async def admit(self, state: LearnerState) -> None:
        """Admit prompts up to the staleness bound on outstanding prompts."""
        limit = (self.settings.run.max_staleness + 1) * self.settings.learner.batch_prompts
        ledger = state.ledger
        longest = self.settings.learner.max_prompt_tokens
        while len(ledger.outstanding) < limit:
            pos = state.cursor
            ids = self._encode(pos)
            if longest and len(ids) > longest:
                state.cursor += 1
                self.metrics.prompts_too_long.inc()
                log.warning(
                    "dataset item %d skipped: its prompt has %d tokens > "
                    "TREEPO_LEARNER__MAX_PROMPT_TOKENS=%d",
                    self.order.item(pos),
                    len(ids),
                    longest,
                )
                continue
            entry_id = await self._publish(pos, state.step, ids)
            ledger.admit(prompt_id(pos), pos, entry_id, time.time())
            state.cursor += 1
            self.metrics.prompts_admitted.inc()
        self.metrics.prompts_in_flight.set(len(ledger.outstanding))

    def _encode(self, pos: int) -> list[int]:
        problem = self.problems[self.order.item(pos)]
        o = self.settings.learner
        return encode_prompt(
            self.tokenizer, problem.prompt, o.chat_template, o.prompt_template, o.system_prompt
        )

    async def _publish(self, pos: int, version: int, ids: list[int] | None = None) -> str:
        problem = self.problems[self.order.item(pos)]
        ids = self._encode(pos) if ids is None else ids
        task = PromptTask(
            prompt_id(pos), ids, problem.answer, pos, version, problem.task, time.time()
        )
        return await self.streams.publish(self.streams.keys.prompts, task)

    async def readmit(self, state: LearnerState, since: Resolved, pid: str, stale: bool) -> bool:
        """Admit ``pid`` once more; False (and the prompt is abandoned) once it has been
        admitted ``max_admissions`` times."""
        a = state.ledger.outstanding[pid]
        if a.attempts >= self.settings.learner.max_admissions:
            self.abandon(state, since, pid, f"after {a.attempts} admissions")
            return False
        entry_id = await self._publish(a.position, state.step)
        state.ledger.readmit(pid, entry_id, time.time(), stale)
        since.readmitted.append(pid)
        self.metrics.prompts_readmitted.labels("stale" if stale else "overdue").inc()
        return True

    def abandon(self, state: LearnerState, since: Resolved, pid: str, why: str) -> None:
        state.ledger.finish(pid, "abandoned")
        since.abandoned.append(pid)
        self.metrics.prompts_abandoned.inc()
        log.warning("prompt %s abandoned: %s", pid, why)

    async def readmit_overdue(
        self, state: LearnerState, since: Resolved, waiting: set[str]
    ) -> None:
        """Admit again every prompt whose tree is overdue: not ``waiting`` here for a batch, not
        queued on the prompts stream, not held by a live sampler (checked every few seconds).
        While trees wait unread on the stream, one of them may be an overdue prompt's: then only
        prompts overdue twice over are admitted again. Samplers that outrun the learner keep
        some trees unread at every check, and a lost prompt must not wait for that to end; a
        tree that does arrive for it afterwards is one of two for the prompt, and the second of
        them is dropped as a duplicate (never trained twice)."""
        after = self.settings.learner.readmit_after_s
        now = time.monotonic()
        if now - self.last_overdue_check < min(10.0, after / 4):
            return
        self.last_overdue_check = now
        wall = time.time()
        overdue = state.ledger.overdue(wall, after)
        if not overdue:
            return
        keys = self.streams.keys
        if (await self.streams.group_info(keys.trees, TREE_GROUP)).lag > 0:
            overdue = [a for a in overdue if wall - a.admitted_at >= 2 * after]
        for a in overdue:
            if a.prompt_id in waiting:
                continue
            where, consumer = await self.streams.entry_state(keys.prompts, PROMPT_GROUP, a.entry_id)
            if where == "queued":
                continue
            if where == "pending" and consumer and await self.streams.alive([consumer]):
                continue
            log.warning(
                "prompt %s overdue (%.0fs, entry %s %s); admitting it again",
                a.prompt_id,
                time.time() - a.admitted_at,
                a.entry_id,
                where if consumer is None else f"held by dead {consumer}",
            )
            await self.readmit(state, since, a.prompt_id, stale=False)
