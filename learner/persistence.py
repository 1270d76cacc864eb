"""What the learner makes durable: checkpoints (then the acknowledgement of the trees they
hold), published weight versions, and the final model directory.

Trees are acknowledged only after the checkpoint that holds their update is on disk, so a
crash neither loses nor double-trains one (the checkpoint lists every trained tree id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from learner.canary import make_canary
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.metrics import LearnerMetrics
from learner.ranks import control
from learner.state import LearnerState
from learner.steplog import cut_step_log
from learner.trainer import Engine, save_pretrained
from pipeline.checkpoints import latest_checkpoint
from pipeline.config import LearnerSettings
from pipeline.errors import Stopping, TransportError
from pipeline.weights.manifest import Canary, Manifest
from pipeline.weights.server import WeightStore, announce
from pipeline.wire.streams import TREE_GROUP, Streams

log = logging.getLogger("learner.process")


class Persistence:
    def __init__(
        self,
        settings: LearnerSettings,
        engine: Engine,
        streams: Streams,
        metrics: LearnerMetrics,
        stop: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.streams = streams
        self.metrics = metrics
        self.stop = stop
        self.work = Path(settings.learner.work_dir)
        self.ckpt_root = self.work / "checkpoints"
        self.store = WeightStore(
            self.work / "weights",
            keep=settings.weights.keep_versions,
            full_every=settings.weights.full_every,
            digest=settings.weights.piece_digest,
        )
        self.ctl = control()
        self.canary_ids: list[int] | None = None
        """The canary's tokens (``learner.canary``); None publishes versions without one."""

    def resume(self, rng: random.Random) -> LearnerState | None:
        """The state of the newest checkpoint, with weights, optimizer and ``rng`` restored and
        the step log cut back to it; None when there is no checkpoint."""
        path = latest_checkpoint(self.ckpt_root)
        self.ctl.send("resume", path=str(path) if path else "")
        if path is None:
            return None
        saved = load_checkpoint(path, self.engine, self.ctl)
        state = LearnerState.from_json(saved)
        cut_step_log(self.work, state.step)
        if state.python_rng is not None:
            version, internal, gauss = state.python_rng
            rng.setstate((version, tuple(internal), gauss))
        log.info(
            "resumed from %s: step %d, cursor %d, %d trees trained",
            path,
            state.step,
            state.cursor,
            len(state.trained),
        )
        return state

    async def checkpoint(
        self, state: LearnerState, rng: random.Random, entries: list[str]
    ) -> list[str]:
        """Save a checkpoint of ``state``, then acknowledge the tree ``entries`` it resolved;
        returns the entries still to acknowledge (only when stopping with Redis away)."""
        started = time.perf_counter()
        state.python_rng = rng.getstate()
        await asyncio.to_thread(self._save, state.step, state.to_json())
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
        keys = self.streams.keys
        try:
            await self.streams.ack(keys.trees, TREE_GROUP, entries)
            # the streams only keep what some group has yet to read or acknowledge
            for stream in (keys.trees, keys.prompts):
                await self.streams.trim_acknowledged(stream)
        except (TransportError, Stopping) as exc:
            if not self.stop.is_set():
                raise
            # stopping: the shutdown's last checkpoint tries once more; if Redis is away, the
            # trees stay pending and come back to this consumer on restart, where the
            # checkpoint marks them as already resolved
            log.warning("stopping: %d trees not acknowledged yet (%s)", len(entries), exc)
            return entries
        return []

    def _save(self, step: int, state: dict[str, Any]) -> None:
        self.ctl.send("save", step=step)
        save_checkpoint(
            self.ckpt_root,
            step,
            self.engine,
            state,
            self.ctl,
            self.settings.learner.keep_checkpoints,
        )

    def _export(self, directory: Path | None, weights_only: bool = True) -> None:
        self.ctl.send("gather", weights_only=weights_only)
        save_pretrained(self.engine, directory, weights_only)

    def _canary(self) -> Canary | None:
        """The canary of the weights now, on every rank (``learner.canary``)."""
        if self.canary_ids is None:
            return None
        self.ctl.send("canary", token_ids=self.canary_ids)
        return make_canary(self.engine.module, self.canary_ids)

    async def publish(self, version: int, base_url: str) -> None:
        """Export (once), serve and announce the weights of ``version``."""
        started = time.perf_counter()
        if version not in self.store.versions():
            canary = await asyncio.to_thread(self._canary)
            await asyncio.to_thread(self.store.publish, version, self._export, canary)
        data = self.store.manifest_bytes(version)
        total = Manifest.from_bytes(data).total_bytes
        token = self.settings.weights.token
        secret = token.get_secret_value() if token else None
        try:
            await announce(self.streams, version, base_url, data, total, secret)
        except (TransportError, Stopping) as exc:
            if not self.stop.is_set():
                raise
            # stopping with Redis away: the version is in the checkpoint and the weight store,
            # and a restarted learner announces it first thing
            log.warning("stopping: weights v%d not announced (%s)", version, exc)
            return
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self.metrics.publish_bytes.inc(total)
        delta = Manifest.from_bytes(data).delta
        delta_bytes = sum(f.size for f in delta.files) if delta is not None else 0
        self.metrics.publish_delta_bytes.inc(delta_bytes)
        record = {
            "version": version,
            "bytes": total,
            "delta_base": delta.base if delta is not None else None,
            "delta_bytes": delta_bytes if delta is not None else None,
            "delta_computed_bytes": self.store.last_delta_bytes,
            "seconds": time.perf_counter() - started,
        }
        with (self.work / "weights.jsonl").open("a") as f:  # what every update cost on the wire
            f.write(json.dumps(record) + "\n")

    def save_final_model(self, tokenizer: Any, step: int) -> Path:
        """The trained policy as a normal Hugging Face model directory (``<work>/model``)."""
        out = self.work / "model"
        self._export(out, weights_only=False)
        tokenizer.save_pretrained(str(out))
        log.info("final model (step %d) saved to %s", step, out)
        return out
