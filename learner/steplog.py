"""The learner's step log: one typed record per optimizer step, appended as a JSON line to
``<work_dir>/steps.jsonl`` and logged in one line (fields documented in docs/operations.md)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from learner.rules import leaf_summary
from learner.state import LearnerState, Resolved
from learner.trainer import StepStats
from pipeline.errors import ConfigError
from pipeline.wire.messages import TreeRollout

log = logging.getLogger("learner.process")


@dataclass
class StepRecord:
    step: int
    version: int
    reward: float
    accuracy: float
    sampled_reward: float | None
    sampled_accuracy: float | None
    trees: int
    leaves: int
    staleness_mean: float
    staleness_max: int
    seconds: float
    tokens_per_second: float
    wall: float
    training_seconds: float
    wait_seconds: float
    tokens_received: int
    dropped_stale: int
    dropped_no_signal: int
    tree_ids: list[str]
    no_signal_ids: list[str]
    abandoned_ids: list[str]
    readmitted_ids: list[str]
    outstanding: int
    loss: float
    is_weight_mean: float
    is_truncated_fraction: float
    is_ess: float
    clip_fraction: float
    approx_kl: float
    grad_norm: float
    lr: float
    tokens_computed: float
    """Token positions the step's forward passes computed (packed trees: each token once)."""
    tokens_per_leaf: float
    """What one row per leaf (no padding) would have computed for the same passes."""
    padding_fraction: float = 0.0
    """Share of the step's forward row positions that were padding (rows padded to the widest
    of their micro-batch)."""
    eval_accuracy: float | None = None
    """Greedy held-out accuracy of the newest evaluation (``eval_every``), None before one."""
    eval_step: int | None = None
    """The step whose published weights that evaluation scored."""

    @staticmethod
    def loss_fields(stats: StepStats) -> dict[str, float]:
        """The step's loss statistics, as the record names them."""
        return {
            "loss": stats.loss,
            "is_weight_mean": stats.is_weight_mean,
            "is_truncated_fraction": stats.is_truncated_fraction,
            "is_ess": stats.is_ess,
            "clip_fraction": stats.clip_fraction,
            "approx_kl": stats.approx_kl,
            "grad_norm": stats.grad_norm,
            "lr": stats.lr,
            "tokens_computed": stats.tokens_computed,
            "tokens_per_leaf": stats.tokens_per_leaf,
            "padding_fraction": stats.padding_fraction,
        }


@dataclass
class TrainingClock:
    """The learner's clocks: training time runs from the first tree (``max_seconds`` counts
    from there), and the seconds it waited for trees after that are its idle time."""

    started: float = field(default_factory=time.monotonic)
    first_tree_at: float | None = None
    wait_seconds: float = 0.0

    def waited(self, since: float, got_trees: bool) -> float:
        """A read of the tree stream that began at ``since`` has returned; its seconds."""
        now = time.monotonic()
        if self.first_tree_at is not None and self.first_tree_at < since:
            self.wait_seconds += now - since
        if got_trees and self.first_tree_at is None:
            self.first_tree_at = now
        return now - since

    def training_seconds(self, started: bool = True) -> float:
        """Seconds since the first tree (before it: since the start, or 0 if not ``started``)."""
        if self.first_tree_at is None:
            return time.monotonic() - self.started if started else 0.0
        return time.monotonic() - self.first_tree_at


def step_record(
    state: LearnerState,
    version: int,
    trees: list[TreeRollout],
    lags: list[int],
    rewards: list[float],
    received: list[float],
    stats: StepStats,
    seconds: float,
    clock: TrainingClock,
    resolved: Resolved,
    last_eval: tuple[float, int] | None,
) -> StepRecord:
    """The step log record of the step just taken: the trained ``trees`` (their staleness
    ``lags`` and leaf ``rewards``), the leaves ``received`` since the last step, the loss
    ``stats`` and the step's ``seconds``."""
    reward, accuracy = leaf_summary(rewards)
    sampled_reward, sampled_accuracy = leaf_summary(received) if received else (None, None)
    return StepRecord(
        step=state.step,
        version=version,
        reward=reward,
        accuracy=accuracy,
        sampled_reward=sampled_reward,
        sampled_accuracy=sampled_accuracy,
        trees=len(trees),
        leaves=len(rewards),
        staleness_mean=sum(lags) / len(lags),
        staleness_max=max(lags),
        seconds=seconds,
        tokens_per_second=stats.tokens / max(seconds, 1e-9),
        wall=time.monotonic() - clock.started,
        training_seconds=clock.training_seconds(),
        wait_seconds=clock.wait_seconds,
        tokens_received=state.tokens_received,
        dropped_stale=state.dropped_stale,
        dropped_no_signal=state.dropped_no_signal,
        tree_ids=[t.tree_id for t in trees],
        no_signal_ids=resolved.no_signal,
        abandoned_ids=resolved.abandoned,
        readmitted_ids=resolved.readmitted,
        outstanding=len(state.ledger.outstanding),
        **StepRecord.loss_fields(stats),
        eval_accuracy=last_eval[0] if last_eval else None,
        eval_step=last_eval[1] if last_eval else None,
    )


def write_step(work: Path, r: StepRecord) -> None:
    """Append ``r`` to the step log and log its headline."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / "steps.jsonl").open("a") as f:
        f.write(json.dumps(asdict(r)) + "\n")
    log.info(
        "step %d reward %+.3f acc %.2f loss %+.4f staleness %.1f (max %d) is_w %.3f ess %.2f "
        "%.0f tok/s",
        r.step,
        r.reward,
        r.accuracy,
        r.loss,
        r.staleness_mean,
        r.staleness_max,
        r.is_weight_mean,
        r.is_ess,
        r.tokens_per_second,
    )


class TensorBoardLog:
    """The step log's numbers as TensorBoard scalars (``TREEPO_LEARNER__TENSORBOARD_DIR``;
    needs the ``tracking`` extra: ``pip install 'treepo[tracking]'``)."""

    def __init__(self, directory: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "TREEPO_LEARNER__TENSORBOARD_DIR needs the tensorboard package "
                "(pip install 'treepo[tracking]')"
            ) from None
        self.writer = SummaryWriter(log_dir=directory)

    def write(self, r: StepRecord) -> None:
        for name, value in asdict(r).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                self.writer.add_scalar(name, value, r.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def cut_step_log(work: Path, step: int) -> None:
    """Drop step records past ``step`` (the checkpoint a restarted learner resumed from): those
    updates were lost with the crash and are done again, so the log lists exactly the durable
    steps."""
    path = work / "steps.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    if len(keep) < len(lines):
        path.write_text("".join(line + "\n" for line in keep))
        log.info("step log cut back to step %d (%d records dropped)", step, len(lines) - len(keep))
