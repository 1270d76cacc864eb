"""The vLLM path engine on the real CPU engine: weight swaps between steps with every token's
version exact (checked against the engine's own record), siblings finding their parent's context
in the prefix cache, stopping, and trees grown without barriers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pipeline.config import TreeConfig
from pipeline.treepo.sampling import PathRequest, TreeSampler
from tests.helpers import run_restoring
from workers.engine import EngineFailed, GenerationStopped, VLLMPathGenerator

pytestmark = pytest.mark.slow


def prompt(tokenizer, text: str = "12+34+5=") -> list[int]:  # type: ignore[no-untyped-def]
    return list(tokenizer(text)["input_ids"])


def test_a_swap_lands_between_steps_and_every_token_carries_its_version(
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """Paths running across a swap: the tokens before it carry the old version, those after it
    the new one, exactly where vLLM's own per-step labels put the change, also when the tokens
    reach the sampler in batches that straddle the swap."""
    start = engine.policy_version
    new = start + 7

    async def main() -> list[object]:
        # tokens come in batches of 8 (as a tree's segments do): some batches straddle the swap
        paths = [engine.open(PathRequest(prompt(tokenizer), 40, 8)) for _ in range(6)]
        firsts = [await p.next(2) for p in paths]
        assert all(s.policy_version == start for s in firsts)
        d = tmp_path / "same-weights"
        d.mkdir()
        (d / "model.safetensors").write_bytes(
            (Path(engine.options.model) / "model.safetensors").read_bytes()
        )
        engine.stage_weights(new, d)
        assert await engine.apply_staged() is not None
        assert engine.policy_version == new
        requests = [await p._resolved() for p in paths]
        for p, r in zip(paths, requests):  # read each to its end
            while not (r.done and r.read == len(r.tokens)):
                await p.next(1)
        return requests  # type: ignore[return-value]

    requests = run_restoring(engine, tmp_path, start, main())
    straddled = 0
    for r in requests:
        versions = r.versions  # type: ignore[attr-defined]
        assert versions == sorted(versions) and set(versions) <= {start, new}
        assert r.spans is not None, "the engine reports its own version spans"  # type: ignore[attr-defined]
        engine_view = [v for v, a, b in r.spans for _ in range(a, b)]  # type: ignore[attr-defined]
        assert versions == engine_view
        straddled += len(set(versions)) == 2
    assert straddled >= 1, "no request ran across the swap"


@pytest.mark.parametrize("mode", ["recompute", "keep"])
def test_a_swap_keeps_or_recomputes_the_running_paths_context(
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    mode: str,
) -> None:
    """``swap_kv``: under ``recompute`` the swap counts the running paths' context and the
    engine computes it again in the steps after (vLLM's own count of preempted requests'
    uncached context); under ``keep`` nothing is dropped and nothing is computed again."""
    from workers.engine import SwapStats

    start = engine.policy_version
    swaps: list[SwapStats] = []
    engine.meter.swap_listeners.append(swaps.append)
    engine.options.swap_kv = mode
    context = len(prompt(tokenizer)) + 8

    async def main() -> tuple[int, int]:
        paths = [engine.open(PathRequest(prompt(tokenizer), 40, 8)) for _ in range(4)]
        for p in paths:
            await p.next(8)
        requests = [await p._resolved() for p in paths]
        running = engine.running_context_tokens()
        d = tmp_path / "same-weights"
        d.mkdir()
        (d / "model.safetensors").write_bytes(
            (Path(engine.options.model) / "model.safetensors").read_bytes()
        )
        engine.stage_weights(start + 1, d)
        steps: list[int] = []
        engine.meter.listeners.append(lambda st: steps.append(st.recomputed_tokens))
        assert await engine.apply_staged() is not None
        for p, r in zip(paths, requests):
            while not (r.done and r.read == len(r.tokens)):
                await p.next(1)
        engine.meter.listeners.pop()
        return running, sum(steps)

    try:
        running, prefilled = run_restoring(engine, tmp_path, start, main())
    finally:
        engine.options.swap_kv = "keep"
        engine.meter.swap_listeners.remove(swaps.append)
    assert running >= 4 * context
    assert swaps[0].load_seconds > 0
    if mode == "recompute":
        assert swaps[0].dropped_tokens == running and swaps[0].reset_seconds > 0
        assert prefilled >= running // 2, "the engine computed the dropped context again"
    else:
        assert swaps[0].dropped_tokens == 0 and swaps[0].reset_seconds == 0
        assert prefilled == 0, "keep: no running path computed its context again"


def test_a_sibling_finds_its_parents_context_in_the_prefix_cache(
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    """A path that goes on keeps its KV; a new sibling at its boundary computes only what lies
    past the last full KV block of the shared context."""
    context = prompt(tokenizer, "+".join(str(10 + i) for i in range(25)) + "=")
    assert len(context) > 2 * engine.block_size

    async def main() -> tuple[int, int]:
        engine.reset_prefix_cache()
        parent = engine.open(PathRequest(context, 8))
        first = await parent.next(4)
        before = engine.meter.snapshot()
        sibling = engine.open(PathRequest(context + first.token_ids, 4))
        await sibling.next(1)
        after = engine.meter.snapshot()
        parent.cancel()
        sibling.cancel()
        return int(after["cached_tokens"] - before["cached_tokens"]), int(
            after["prefill_tokens"] - before["prefill_tokens"]
        )

    cached, computed = asyncio.run(main())
    full_blocks = (len(context) // engine.block_size) * engine.block_size
    assert cached >= full_blocks
    assert computed <= len(context) + 4 - full_blocks


def test_stopping_ends_every_read(engine: VLLMPathGenerator, tokenizer) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        path = engine.open(PathRequest(prompt(tokenizer), 40))
        try:
            await path.next(1)
            engine.request_stop()
            with pytest.raises(GenerationStopped):
                await path.next(30)
            with pytest.raises(GenerationStopped):
                engine.open(PathRequest(prompt(tokenizer), 4))
        finally:  # the request would otherwise run on into the next test's engine steps
            path.cancel()

    try:
        asyncio.run(main())
    finally:
        engine.stopping = False


def test_trees_grow_on_the_engine_loop_with_no_barrier(
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    """Many trees at once through ``call`` (as the sampler runs them): every tree is complete,
    the engine ran paths of several trees in the same steps, and every request ended."""
    cfg = TreeConfig(
        width=4,
        segment_tokens=4,
        max_depth=8,
        initial_divergence=2,
        eos_token_id=engine.eos_token_id,
    )
    sampler = TreeSampler(
        engine, cfg, rng=0, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    )
    steps: list[object] = []
    engine.meter.listeners.append(steps.append)
    before = engine.meter.snapshot()

    async def main() -> list[object]:
        return list(
            await asyncio.gather(*(engine.call(sampler.grow(prompt(tokenizer))) for _ in range(6)))
        )

    started_at = time.perf_counter()
    try:
        trees = asyncio.run(main())
    finally:
        engine.meter.listeners.remove(steps.append)
    wall = time.perf_counter() - started_at
    after = engine.meter.snapshot()
    assert all(len(t.leaves) == 4 for t in trees)  # type: ignore[attr-defined]
    assert max(s.decoded_tokens for s in steps) > cfg.width  # type: ignore[attr-defined]
    # every path, a sibling forked at a boundary included, got its first token in the very next
    # engine step (the trees decide and submit between steps)
    started = after["requests_started"] - before["requests_started"]
    assert started >= 6 * cfg.width
    assert after["start_steps"] - before["start_steps"] == started
    # the engine's own step time is part of the run's, apart from the trees' work between steps
    in_step = after["in_step_seconds"] - before["in_step_seconds"]
    assert 0 < in_step < wall
    assert not engine.live and engine.meter.in_flight == 0


def test_a_failed_engine_step_fails_every_path_as_an_engine_failure(
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    """A step that raises (as a dead engine does) fails the running paths and every later
    request with ``EngineFailed``, a RuntimeError: never a ValueError, which the sampler would
    take for a refused prompt and dead-letter."""
    real_step = engine.engine.step
    calls = 0

    def broken() -> object:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise ValueError("the engine died")
        return real_step()

    async def main() -> None:
        path = engine.open(PathRequest(prompt(tokenizer), 40))
        with pytest.raises(EngineFailed, match="ValueError: the engine died"):
            await path.next(30)
        with pytest.raises(EngineFailed):
            await engine.open(PathRequest(prompt(tokenizer), 4)).next(1)

    engine.engine.step = broken
    try:
        asyncio.run(main())
        assert not engine.live and engine.meter.in_flight == 0
        assert not isinstance(engine.failed, ValueError)
    finally:  # the session's engine works again for the other tests
        engine.engine.step = real_step
        engine.failed = None
        engine._driver = asyncio.run_coroutine_threadsafe(engine._drive(), engine.loop)


def test_the_cpu_engine_runs_its_model_in_this_process(
    engine: VLLMPathGenerator,
    tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    """On the CPU backend the model runs in the sampler's process: no vLLM worker process among
    this process's children while the engine decodes; a bound or multi-worker engine keeps
    vLLM's worker processes."""
    import psutil

    from workers.engine import EngineOptions, _in_process

    async def main() -> int:
        path = engine.open(PathRequest(prompt(tokenizer), 30))
        got = await path.next(30)
        return len(got.token_ids)

    assert asyncio.run(main()) > 0
    names = [p.name() for p in psutil.Process().children(recursive=True)]
    assert not [n for n in names if "VLLM" in n], names
    executor = type(engine.engine.engine_core.engine_core.model_executor).__name__
    assert executor == "UniProcExecutor", executor
    assert not _in_process(EngineOptions(model="m", cpu_bind="auto"))
    assert not _in_process(EngineOptions(model="m", extra={"tensor_parallel_size": 2}))
    assert not _in_process(EngineOptions(model="m", model_in_process=False))
    assert _in_process(EngineOptions(model="m"))
    # a second engine alive beside it gets vLLM's worker process, and closing it leaves the
    # first one working (vLLM's distributed state is per process)
    other = VLLMPathGenerator(EngineOptions(model=engine.options.model, dtype="float32"))
    try:
        assert engine.in_process and not other.in_process
        kids = [p.name() for p in psutil.Process().children(recursive=True)]
        assert [n for n in kids if "VLLM" in n], kids
    finally:
        other.close()
    assert asyncio.run(main()) > 0


def test_engine_defaults_follow_the_device() -> None:
    """``auto`` engine settings: the model's dtype, 0.85 of the GPU and CUDA graphs on CUDA;
    float32, 0.3 and eager on CPU; explicit settings kept as given."""
    from workers.engine import device_defaults

    assert device_defaults("auto", 0.0, None, cuda=True) == ("auto", 0.85, False)
    assert device_defaults("auto", 0.0, None, cuda=False) == ("float32", 0.3, True)
    assert device_defaults("bfloat16", 0.5, True, cuda=True) == ("bfloat16", 0.5, True)


def test_trees_in_flight_are_capped_by_the_kv_cache() -> None:
    from workers.engine import trees_that_fit

    # a 7B engine's ~1.9M-token cache, 16 paths of 4k tokens (+ 512 prompt allowance) a tree
    assert trees_that_fit(64, 1_900_000, 16 * 4096 + 512) == 28
    assert trees_that_fit(8, 1_900_000, 16 * 4096 + 512) == 8  # fewer wanted: kept
    assert trees_that_fit(64, 1000, 10_000) == 1  # never 0
    assert trees_that_fit(64, 0, 10_000) == 64  # capacity unknown: as asked
