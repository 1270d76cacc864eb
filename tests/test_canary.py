"""Proof that a weight swap took: the learner's canary in the manifest, its log-probs against an
independent computation, and the sampler's check on the real engine (a swap that loads
nothing is caught, its trees are never published, and the sampler gives up after its
attempts)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from learner.canary import canary_logprobs, canary_tokens, make_canary
from pipeline.errors import WeightVerificationError
from pipeline.weights.manifest import Canary, Manifest, write_manifest
from tests.helpers import make_streams, run_restoring
from tests.services import RedisServer
from workers.engine import RELOAD_LOGGER, SWAP_INFO_LOGGERS


def test_a_manifest_carries_its_canary_and_refuses_a_malformed_one(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 8)
    canary = Canary((5, 6, 7), (-0.5, -1.25))
    manifest, data = write_manifest(tmp_path, 3, canary=canary)
    assert Manifest.from_bytes(data).canary == canary == manifest.canary
    body = json.loads(data)
    for bad in (
        {"token_ids": [5, 6, 7], "logprobs": [-0.5]},
        {"token_ids": [5, 6], "logprobs": [0.5]},
    ):
        body["canary"] = bad
        with pytest.raises(WeightVerificationError, match="malformed"):
            Manifest.from_bytes(json.dumps(body).encode())


def test_the_canary_is_the_models_own_sequence_log_likelihood(toy_model: Path) -> None:
    """Independently: transformers' own language-model loss on the same tokens is the negative
    mean of the canary's log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(toy_model), dtype=torch.float32)
    ids = canary_tokens(AutoTokenizer.from_pretrained(str(toy_model)))
    logprobs = canary_logprobs(model, ids)
    assert len(logprobs) == len(ids) - 1 and all(x <= 0 for x in logprobs)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert -sum(logprobs) / len(logprobs) == pytest.approx(float(loss), abs=1e-5)


def perturbed_version(toy_model: Path, tmp: Path, version: int, scale: float) -> Path:
    """A weight version whose final norm and (tied) embeddings are scaled by ``scale``, with its
    manifest and canary. The embeddings matter: vLLM's CPU backend packs a copy of a tied head
    for its logits GEMM that an in-place reload leaves stale (``_repack_embedding_heads``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(toy_model), dtype=torch.float32)
    with torch.no_grad():
        for p in model.model.norm.parameters():
            p.mul_(scale)
        model.model.embed_tokens.weight.mul_(scale)
    canary = make_canary(model, canary_tokens(AutoTokenizer.from_pretrained(str(toy_model))))
    d = tmp / f"v{version}"
    model.save_pretrained(str(d), safe_serialization=True)
    for extra in d.iterdir():
        if not extra.name.endswith(".safetensors"):
            extra.unlink()
    write_manifest(d, version, canary=canary)
    return d


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_only_the_layers_no_checkpoint_holds_are_quiet_on_reload() -> None:
    """The rotary cache never loads from a checkpoint, nor does a tied head; a layer that
    should have loaded and did not (an untied head, any other layer) still warns."""
    from workers.engine import _ExpectedReloadWarnings

    def passes(layer: str, tied: bool) -> bool:
        record = logging.LogRecord(
            RELOAD_LOGGER,
            logging.WARNING,
            __file__,
            1,
            "%s: Failed to load weights",
            (layer,),
            None,
        )
        return _ExpectedReloadWarnings(tied).filter(record)

    assert not passes("RotaryEmbedding", tied=False)
    assert not passes("ParallelLMHead", tied=True)
    assert passes("ParallelLMHead", tied=False)
    assert passes("QKVParallelLinear", tied=True)


def load_nothing(engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Make the engine's weight reload a silent no-op (the failure a broken update path has)."""
    real = engine.engine.collective_rpc

    def rpc(method: str, *args: object, **kwargs: object) -> object:
        return None if method == "reload_weights" else real(method, *args, **kwargs)

    monkeypatch.setattr(engine.engine, "collective_rpc", rpc)


@pytest.mark.slow
def test_the_check_proves_a_real_swap_and_catches_one_that_loaded_nothing(
    engine,
    toy_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:  # type: ignore[no-untyped-def]
    from workers.canary import CanaryCheck, CanaryFailed
    from workers.engine import read_weights
    from workers.metrics import SamplerMetrics

    start = engine.policy_version
    metrics = SamplerMetrics()
    check = CanaryCheck(engine, metrics, tolerance=0.05, attempts=2)
    good = perturbed_version(toy_model, tmp_path, start + 1, 1.3)
    bad = perturbed_version(toy_model, tmp_path, start + 2, 0.7)
    reload_log = Records()
    swap_loggers = [logging.getLogger(n) for n in (RELOAD_LOGGER, *SWAP_INFO_LOGGERS)]
    for logger in swap_loggers:
        logger.addHandler(reload_log)

    async def main() -> None:
        engine.stage_weights(start + 1, good)
        await engine.apply_staged()
        assert await check.check(start + 1, good)  # fp32 engine vs fp32 learner: far below
        # vLLM's "Failed to load weights" for the rotary cache and the tied head, its INFO lines
        # on the checkpoint and the reload, and its progress bar say nothing a swap needs
        assert not [r.getMessage() for r in reload_log.records]
        assert "checkpoint shards" not in capfd.readouterr().err
        assert metrics.canary_mismatch._value.get() < 1e-3
        # a swap from memory (tensors read beforehand) takes as well
        from_memory = perturbed_version(toy_model, tmp_path, start + 3, 1.6)
        check.gate.clear()
        engine.stage_weights(start + 3, from_memory, read_weights(from_memory))
        await engine.apply_staged()
        assert await check.check(start + 3, from_memory)
        assert metrics.canary_mismatch._value.get() < 1e-3
        load_nothing(engine, monkeypatch)
        check.gate.clear()
        engine.stage_weights(start + 2, bad)
        await engine.apply_staged()
        assert not await check.check(start + 2, bad)  # the engine still holds the good one
        assert metrics.canary_mismatch._value.get() > 0.05 and not check.gate.is_set()
        assert check.failures == 1 and engine.staged() == (start + 2, bad)  # tried again
        await engine.apply_staged()
        with pytest.raises(CanaryFailed, match=f"v{start + 2} did not take after 2"):
            await check.check(start + 2, bad)
        assert metrics.canary_failures._value.get() == 2

    try:
        run_restoring(engine, tmp_path, start, main())
    finally:
        monkeypatch.undo()
        for logger in swap_loggers:
            logger.removeHandler(reload_log)


@pytest.mark.slow
def test_a_sampler_never_publishes_a_tree_of_weights_it_does_not_hold(
    redis_server: RedisServer,
    engine,  # type: ignore[no-untyped-def]
    tokenizer,  # type: ignore[no-untyped-def]
    toy_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Trees growing while a version that loaded nothing is swapped in: the check fails, those
    trees are dropped (their prompts handed back), no tree carries the version, the sampler
    claims nothing more and exits with an error after its attempts."""
    from tests.test_sampler import make_sampler, push, tasks

    start = engine.policy_version
    bad = perturbed_version(toy_model, tmp_path, start + 1, 0.7)

    async def main() -> None:
        s = make_streams(redis_server)
        await push(s, tasks(tokenizer, 8))
        sampler = make_sampler(
            redis_server, tmp_path, engine, tokenizer, trees_in_flight=2, canary_attempts=2
        )
        running = asyncio.create_task(sampler.run())
        deadline = time.monotonic() + 60
        while sampler.prompts_done < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        load_nothing(engine, monkeypatch)
        engine.stage_weights(start + 1, bad)
        await asyncio.wait_for(running, 60)
        assert sampler.exit_code() == 1
        m = sampler.metrics
        assert m.canary_failures._value.get() == 2
        await s.ensure_group(s.keys.trees, "learner")
        trees = [d.message for d in await s.read(s.keys.trees, "learner", "t", count=100)]
        assert 1 <= len(trees) == sampler.prompts_done < 8
        assert all(n.policy_version == start for t in trees for n in t.nodes)  # type: ignore[attr-defined]
        await s.close()

    try:
        run_restoring(engine, tmp_path, start, main())
    finally:
        monkeypatch.undo()
        engine.stopping = False
