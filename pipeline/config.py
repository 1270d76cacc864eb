"""Settings of every process, read from ``TREEPO_*`` environment variables.

One settings class per process (``SamplerSettings``, ``LearnerSettings``) built from shared
sub-models, so one ``.env`` file configures a whole run. Nesting uses ``__``:
``TREEPO_TREE__WIDTH=16`` sets ``settings.tree.width``. Every field has a docstring and bounds;
``docs/configuration.md`` is generated from them (``treepo config docs``).

This module only describes and validates settings; it opens no connections.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "TREEPO_"
_RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


REWARD_PATTERN = (
    r"^(arith|math|rg|rg_boxed|rg_answer_is|rg_last_number|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$"
)
"""A built-in reward name or ``package.module:function``."""

Allocation = Literal["uniform", "logprob_high", "logprob_low", "entropy_high", "entropy_low"]


class TreeConfig(BaseModel):
    """Shape and budget of the trees (TREEPO.md section 1)."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)

    width: int = Field(16, ge=1, le=4096)
    """w: leaves per prompt (the group size)."""
    segment_tokens: int = Field(512, ge=1, le=1_000_000)
    """l: tokens per segment; every non-final segment is exactly this long."""
    max_depth: int = Field(14, ge=1, le=10_000)
    """d: most segments on one path."""
    branching: int = Field(2, ge=1, le=4096)
    """b: children per active path per step when budget allows."""
    initial_divergence: int = Field(2, ge=1, le=4096)
    """Root fan-out: paths started from the prompt (clamped to width)."""
    initial_divergence_range: tuple[int, int] | None = None
    """When set, each prompt's root fan-out is drawn uniformly from [lo, hi] (e.g. [2, 8])."""
    max_response_tokens: int | None = Field(None, ge=1)
    """Response length cap in tokens; unset = segment_tokens * max_depth."""
    fallback: bool = True
    """Refill prompts that ran out of active paths by forking from cut leaves."""
    fallback_window: int | None = None
    """Granularity of fallback cuts in tokens: a multiple of segment_tokens. Unset or -1 =
    segment_tokens (cut at any segment boundary)."""
    allocation: Allocation = "uniform"
    """How the extra branches of a step are spread over active paths."""
    allocation_temperature: float = Field(1.0, gt=0, le=1e6)
    """Softmax temperature of the non-uniform allocations."""
    eos_token_id: int | None = Field(None, ge=0)
    """End-of-sequence token; unset = only the engine's own stop ends a path (the sampler fills
    it from the tokenizer)."""
    repetition_ngram: int = Field(16, ge=0, le=4096)
    """A path ends when its response ends with an n-gram (n <= this) repeated
    ``repetition_repeats`` times in a row. 0 disables the detector."""
    repetition_repeats: int = Field(8, ge=2, le=10_000)
    """Consecutive repeats of one n-gram that count as degenerate repetition."""
    answer_stop: Literal["boxed", "none"] = "boxed"
    """``boxed``: a path ends at the segment that closes a ``\\boxed{...}`` answer (finish reason
    ``answer``), as in the paper; ``none``: only EOS, the engine's stops and the caps end it."""

    @field_validator("fallback_window", mode="before")
    @classmethod
    def _unset_window(cls, v: object) -> object:
        return None if v in (-1, "-1", "", None) else v

    @model_validator(mode="after")
    def _check(self) -> TreeConfig:
        rng = self.initial_divergence_range
        if rng is not None and not 1 <= rng[0] <= rng[1]:
            raise ValueError(f"initial_divergence_range {rng}: need 1 <= lo <= hi")
        w = self.fallback_window
        if w is not None and (w <= 0 or w % self.segment_tokens):
            raise ValueError(
                f"fallback_window {w} must be a positive multiple of segment_tokens "
                f"({self.segment_tokens}), or -1/unset for one segment"
            )
        return self

    @property
    def response_cap(self) -> int:
        if self.max_response_tokens is not None:
            return self.max_response_tokens
        return self.segment_tokens * self.max_depth

    @property
    def window_segments(self) -> int:
        """Fallback cut granularity in segments."""
        return (self.fallback_window or self.segment_tokens) // self.segment_tokens


class _Section(BaseModel):
    # unknown nested variables are reported by warn_unknown_env, not rejected
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)


class RedisSettings(_Section):
    """How to reach Redis."""

    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL. Use ``rediss://`` for TLS; a password may be given here or below."""
    username: str | None = None
    """ACL user (overrides one in the URL); ops/redis.conf defines ``learner`` and ``sampler``."""
    password: SecretStr | None = None
    """Password (overrides one in the URL). Never logged."""
    tls_ca_file: str | None = None
    """CA bundle to verify the server's TLS certificate (``rediss://`` only)."""
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    """Seconds to wait for a connection or a reply before retrying."""
    retry_attempts: int = Field(30, ge=1, le=1000)
    """How many times a failed Redis call is retried (with exponential backoff) before giving up;
    the default rides out about two minutes of Redis being away."""
    retry_max_delay_s: float = Field(5.0, gt=0, le=300)
    """Upper bound of the backoff between retries."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class RunSettings(_Section):
    """What identifies a run and bounds its off-policyness."""

    name: str = "default"
    """Run name; every Redis key and stream of the run is prefixed ``treepo:{<name>}:`` (a Redis
    Cluster hash tag, so one run's keys share a slot). Letters, digits, ``_.-``, up to 64."""
    max_staleness: int = Field(1, ge=0, le=64)
    """How many policy versions a tree may lag behind the learner. 0 = synchronous on-policy."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """The run's one seed: prompt order, the toy task's problems, the learner's generators,
    and each sampler's engine and tree shapes (keyed by its worker id or host:port, so two
    samplers draw different numbers and the same sampler the same numbers in every run of the
    seed; ``pipeline/seeds.py``)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _RUN_NAME.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v


class StreamSettings(_Section):
    """Redis Streams consumption knobs."""

    block_ms: int = Field(1000, ge=1, le=60_000)
    """How long one XREADGROUP blocks waiting for entries, in milliseconds."""
    batch: int = Field(16, ge=1, le=10_000)
    """Most entries read by one XREADGROUP."""
    claim_idle_ms: int = Field(60_000, ge=100, le=86_400_000)
    """Pending entries idle longer than this are reclaimed (XAUTOCLAIM): a live sampler marks
    the prompts of its growing trees as in work every third of it, so only a dead one's go idle."""
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=1024, le=2**31 - 1)
    """Largest message accepted from a stream; larger ones go to the dead-letter stream."""


class SamplerOptions(_Section):
    """Options of the sampler process itself."""

    model: str = ""
    """Hugging Face model directory the engine starts from (required)."""
    work_dir: str = "runs/sampler"
    """Where this sampler keeps downloaded weight versions."""
    worker_id: str = ""
    """Consumer name in the ``samplers`` group; empty = ``<host>-<pid>``."""
    host: str = "127.0.0.1"
    """Address the ``/metrics`` and ``/healthz`` server binds."""
    port: int = Field(9101, ge=0, le=65535)
    """Port of the metrics server (``--port``/``$PORT`` under honcho overrides it)."""
    trees_in_flight: int = Field(32, ge=1, le=4096)
    """Trees this sampler grows at once. Each finished tree is published at once and a new
    prompt claimed in its place, so the engine never drains between trees; more trees in flight
    fill the engine's batches better (the default was measured on the toy model, see
    docs/benchmarks.md), fewer keep each tree's policy lag shorter."""
    max_num_seqs: int = Field(256, ge=1, le=65_536)
    """Most requests (tree paths) the engine runs in one step."""
    default_task: str = Field("arith", pattern=REWARD_PATTERN)
    """Reward function for prompts that do not name one (see ``TREEPO_LEARNER__TASK``)."""
    temperature: float = Field(1.0, ge=0.01, le=10.0)
    """Sampling temperature. The behavior policy is the tempered distribution; each tree carries
    it and the learner divides its logits by it, so importance weights measure policy lag only.
    Greedy decoding (0) has no usable log-probs and is refused."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling threshold; must be 1.0 for training (the learner cannot rebuild the
    sampler's nucleus under newer weights, so it would train on wrong log-probs)."""

    @field_validator("top_p")
    @classmethod
    def _full_support(cls, value: float) -> float:
        if value != 1.0:
            raise ValueError(
                f"top_p {value} < 1 is not supported: the learner would compare the truncated "
                "behavior log-probs with full-vocabulary ones; use temperature instead"
            )
        return value

    dtype: str = "auto"
    """Engine dtype: ``auto`` is the model's own dtype on CUDA and ``float32`` on CPU."""
    gpu_memory_utilization: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of device memory vLLM may take; 0 = 0.85 on CUDA, 0.3 on CPU (vLLM's own 0.92
    fails to start on these CPU machines)."""
    enforce_eager: bool | None = None
    """Skip graph capture/compilation; unset = eager on CPU (faster start), CUDA graphs on GPUs."""
    fit_trees_to_kv: bool = True
    """Cap ``trees_in_flight`` at the trees the engine's KV cache holds when each grows to its
    full size (width x max response tokens + a 512-token prompt allowance), read from vLLM at
    start and logged; beyond it vLLM preempts paths and computes them again."""
    canary_tolerance: float = Field(0.1, gt=0, le=100)
    """Mean absolute difference (nats) allowed between the engine's and the learner's log-probs
    of a version's canary after a swap (``workers/canary.py``). Measured: the fp32 CPU engine
    against the fp32 learner differs by under 1e-3; SmolLM2-135M in bf16 against fp32 by 0.043
    (at most 0.20 on one token)."""
    canary_attempts: int = Field(3, ge=1, le=100)
    """Swaps of one version whose canary fails before the sampler stops with an error."""
    swap_from_memory: bool = False
    """Read a verified version's files into memory before its swap (off the engine's loop), so
    the swap only copies tensors in; CPU engines whose model runs in the sampler's process
    only. Off by default: measured on SmolLM2-135M (538 MB), the engine waits 0.96x as long
    as for a swap from disk, because reading from the page cache takes 12 ms of the 670
    (``bench/swap_memory.py``); it may help where the files are on a slow disk."""
    swap_kv: Literal["keep", "recompute"] = "keep"
    """What a weight swap does to the KV cache. ``keep`` (default): running paths and the prefix
    cache keep the keys and values the old weights computed, and every token sampled after the
    swap comes from the new weights (its log-prob, the behaviour policy's, is recorded as
    sampled); ``recompute``: every running path computes its context again under the new
    weights (and the prefix cache is emptied). Chosen by measurement (``bench.compare swap-kv``,
    docs/algorithm.md): the same accuracy and importance weights, no recomputation."""
    max_model_len: int = Field(0, ge=0, le=1_000_000)
    """Engine context length; 0 = the model's own."""
    kv_cache_gib: int = Field(1, ge=1, le=1024)
    """KV cache size on the CPU backend (VLLM_CPU_KVCACHE_SPACE)."""
    block_size: int = Field(32, ge=0, le=1024)
    """KV-cache block size in tokens; 0 = the engine's default (128 on vLLM's CPU backend, 16 on
    CUDA). A path that goes on past a segment boundary keeps its KV in place; a new sibling finds
    its parent's context in the prefix cache up to the last full block and computes the rest
    again. Keep it at or below the segment length: the sampler refuses to start when a segment
    is shorter than a block unless ``allow_short_segments`` is set. The CPU backend needs a
    multiple of 32."""
    allow_short_segments: bool = False
    """Accept segments shorter than the engine's KV block (each new sibling then computes up to a
    block of its parent's context again). The toy model's 8-token segments need it on CPU, whose
    smallest block is 32 tokens."""
    cpu_bind: str = "nobind"
    """CPU backend: cores the engine's threads are bound to (``VLLM_CPU_OMP_THREADS_BIND``):
    ``nobind`` lets the OS schedule them, so several samplers share a machine; ``auto`` is vLLM's
    own binding (one engine per machine); or a core list such as ``0-3``."""
    model_in_process: bool = True
    """CPU backend, unbound (``cpu_bind=nobind``), one engine worker: run the model in the
    sampler's own process instead of vLLM's worker process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
    The worker process gains nothing on CPU: the engine waits for every step, and while it waits
    it spins on a core the model's threads need (measured on 2 cores: 1.5-1.6x the seconds per
    step of the 25M-parameter benchmark model). GPU engines and bound or tensor-parallel CPU
    engines keep vLLM's own choice."""
    heartbeat_ttl_s: float = Field(10.0, ge=1.0, le=3600.0)
    """Heartbeat key time-to-live; refreshed every third of it."""
    weights_poll_s: float = Field(5.0, gt=0.0, le=600.0)
    """How often the weight announcement key is read besides the pub/sub channel (which is
    followed at once): the fallback when a message was missed."""
    public_url: str = ""
    """Base URL other samplers use to fetch weights this sampler relays; empty =
    ``http://<host>:<port>`` (loopback by default: set ``host`` and this when samplers run on
    several machines)."""
    unhealthy_after_s: float = Field(120.0, gt=0.0, le=86_400.0)
    """``/healthz`` answers 503 once the sampler has been unable to take the newest announced
    weights (more than ``max_staleness`` versions behind) for this long, or its loop has made no
    progress for this long."""


class WeightSettings(_Section):
    """Weight broadcast between learner and samplers."""

    token: SecretStr | None = None
    """Bearer token the weight server requires and samplers send (unset: no auth)."""
    public_url: str = ""
    """Base URL samplers use to reach the learner's weight server; empty =
    ``http://<learner.host>:<port>``. Set it when samplers run on other machines."""
    keep_versions: int = Field(3, ge=1, le=1000)
    """Weight versions the learner keeps serving (older ones are deleted)."""
    download_timeout_s: float = Field(600.0, gt=0, le=86_400)
    """Time limit of one version download."""
    parallel: int = Field(4, ge=1, le=64)
    """Pieces of a file a sampler downloads at once (each its own HTTP range request)."""
    serve_slots: int = Field(2, ge=0, le=4096)
    """Receivers one process (the learner or a relaying sampler) serves at once; the others get
    HTTP 503 and take their pieces from a peer that has the version, so the learner sends each
    version about this many times however many samplers there are. 0 = unlimited."""
    relay: bool = True
    """Samplers serve the versions they verified to other samplers (``sampler.public_url``), and
    fetch from such peers before the learner."""
    full_every: int = Field(10, ge=0, le=1_000_000)
    """The learner offers each version as a delta against the previous one (when smaller),
    except every this many versions (0: never a delta). A sampler more than one version behind
    fetches the full files."""
    link_same_machine: bool = True
    """A sampler on the learner's machine hard-links the published files instead of
    downloading them."""
    piece_digest: Literal["xxh3-128", "blake3"] = "xxh3-128"
    """Digest of every 64 MiB piece in the manifest. ``xxh3-128`` catches corruption at ~10 GB/s
    per core (blake3: ~1.5 here), enough when every holder of the token is trusted: the signed
    announcement authenticates the manifest, the token the sources. ``blake3`` is cryptographic
    (a relaying sampler cannot forge a piece) at the cost of CPU on every receiver."""
    share_same_machine: bool = True
    """Samplers on one machine fetch each version once: the first to see it fetches it (a lease
    in Redis), the others hard-link its verified copy."""


class LearnerOptions(_Section):
    """Options of the learner process itself."""

    model: str = ""
    """Hugging Face model directory training starts from (required)."""
    work_dir: str = "runs/learner"
    """Run folder: checkpoints, published weights and the step log."""
    host: str = "127.0.0.1"
    """Address the weight server (and ``/metrics``) binds. Loopback by default."""
    port: int = Field(9100, ge=0, le=65535)
    """Port of the weight server (``--port``/``$PORT`` under honcho overrides it)."""
    dataset: str = "arith"
    """``arith`` (the built-in task) or a local ``.jsonl``/``.parquet`` file."""
    prompt_field: str = "prompt"
    """Dataset field holding the prompt text."""
    answer_field: str = "answer"
    """Dataset field holding the reference answer."""
    task: str = Field("math", pattern=REWARD_PATTERN)
    """Reward function for file datasets (the built-in dataset always uses ``arith``):
    ``math`` (math-verify equivalence of the last ``\\boxed{}``), ``arith`` (exact integer),
    ``rg`` / ``rg_boxed`` / ``rg_answer_is`` / ``rg_last_number`` (reasoning-gym entries from
    ``treepo data reasoning-gym``, scored by the dataset's own verifier: ``pipeline.treepo.gym``), or
    an import path ``package.module:function`` of your own ``f(response, reference) -> float``,
    importable by the learner and every sampler (checked at start)."""
    chat_template: bool = False
    """Wrap prompts with the tokenizer's chat template."""
    prompt_template: str = Field("{prompt}", pattern=r"\{prompt\}")
    """The text given to the model, with the dataset's prompt at ``{prompt}`` (other braces stay
    as written), e.g. ``{prompt}\nPlease reason step by step, and put your final answer within
    \\boxed{}.``"""
    system_prompt: str = ""
    """System message (needs ``chat_template``); empty = none."""
    batch_prompts: int = Field(8, ge=1, le=4096)
    """Trees (prompts) per optimizer step."""
    total_steps: int = Field(100, ge=1, le=10_000_000)
    """The learner exits after this many optimizer steps."""
    max_seconds: float = Field(0.0, ge=0, le=1e9)
    """Also stop after this many seconds of training, counted from the first tree received
    (engine start-up excluded; 0 = no limit); the final model is saved as at ``total_steps``."""
    token_budget: int = Field(0, ge=0, le=10**15)
    """Also stop once the trees received (trained or dropped) hold this many decoded tokens
    (0 = no limit): runs compared at an equal sampling budget."""
    ppo_epochs: int = Field(1, ge=1, le=100)
    """Passes over each batch."""
    mini_batches: int = Field(1, ge=1, le=1024)
    """Optimizer steps per pass (the batch's rows are split evenly)."""
    lr: float = Field(1e-5, ge=0, le=1.0)
    """AdamW learning rate; 0 = no update (the control arm of a comparison)."""
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    """Linear learning-rate warm-up, in optimizer steps."""
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0, le=1e6)
    """Gradient norm clipping."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage (with several ranks, 1-3 partition the optimizer state, gradients
    and parameters across them)."""
    zero3_persistence_threshold: int = Field(100_000, ge=0, le=10**12)
    """ZeRO-3: parameters with fewer elements than this stay whole on every rank (DeepSpeed's
    ``stage3_param_persistence_threshold``; 0 partitions every parameter)."""
    rank_timeout_s: float = Field(600.0, ge=5, le=86_400)
    """With several ranks: a collective that waits this long for a rank fails and the ranks
    exit (a dead rank is usually noticed at once: its connections close)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision: ``auto`` follows the base model's dtype on CUDA (bf16 for a bf16
    model) and is fp32 on CPU. Published weights always take the base model's dtypes."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    """Micro-batches per mini-batch (each mini-batch's rows are split into this many)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    packing: Literal["tree", "leaf"] = "tree"
    """How a batch is computed: ``tree`` packs each tree into one sequence with a tree attention
    mask, so every shared prefix token is computed once; ``leaf`` runs one padded row per leaf
    (the reference; needed for attention kernels that take no 4-D mask)."""
    attention: Literal["auto", "sdpa", "eager", "flex_attention"] = "auto"
    """The model's attention kernel: ``auto`` is FlexAttention with a block mask built from
    the tree (blocks nobody attends are skipped) on CUDA with ``packing = tree``, else SDPA
    with a dense 4-D mask."""
    micro_batch_tokens: int = Field(0, ge=0, le=1_000_000_000)
    """Token positions per forward/backward (packed tokens, or rows x padded length with
    ``packing = leaf``): each mini-batch is cut into as many micro-batches as this needs and
    their gradients accumulated, so peak memory follows the setting whatever the tree shapes (a
    single leaf longer than it is computed alone). 0: ``gradient_accumulation_steps`` parts by
    rows."""
    pack_row_tokens: int = Field(0, ge=0, le=10_000_000)
    """Tokens per packed row: trees fill rows (first fit, longest first) up to this many or the
    longest tree's length, whichever is more. 0 = under FlexAttention the micro-batch budget
    (one row, no padding: its block mask skips what nobody attends), else the longest tree's
    length (no attention beyond one tree a row; padding at most 1 - mean/longest tree length of
    the forward). On the dense 4-D mask path (CPU, SDPA) attention inside a row costs its length
    squared (bench/learner_packing)."""
    threads: int = Field(0, ge=0, le=1024)
    """CPU threads of the learner's torch (0 = torch's default, or ``OMP_NUM_THREADS``): on a
    small machine shared with samplers, the learner may take more threads than they do."""
    head_chunk_mb: int = Field(512, ge=16, le=65_536)
    """Memory budget (MB) of one chunk of the vocabulary projection: the head and log-softmax
    run over chunks of about ``head_chunk_mb / (16 x vocab)`` tokens whose logits are recomputed
    in backward, so no ``[tokens, vocab]`` tensor is kept (``learner.logprobs``)."""
    publish_every: int = Field(1, ge=1, le=1_000_000)
    """Publish weights every this many steps (needs max_staleness >= publish_every - 1)."""
    checkpoint_every: int = Field(1, ge=1, le=1_000_000)
    """Checkpoint every this many steps; trees are acknowledged only once checkpointed."""
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    """Checkpoints kept on disk."""
    shuffle: bool = True
    """Visit the dataset in a new order every epoch, drawn from ``TREEPO_RUN__SEED`` and the
    epoch (a resumed run continues the same order); false = file order."""
    max_prompt_tokens: int = Field(0, ge=0, le=10_000_000)
    """Prompts longer than this many tokens (after the chat template) are skipped at admission,
    counted (``treepo_learner_prompts_too_long_total``) and logged, never sent to a sampler
    whose engine cannot hold them. Set it to the engine's context length minus the tree's
    ``max_response_tokens``; 0 = no limit."""
    tensorboard_dir: str = ""
    """Also write every step record's numbers as TensorBoard scalars here (needs the
    ``tracking`` extra); empty = no TensorBoard."""
    eval_every: int = Field(0, ge=0, le=1_000_000)
    """Evaluate the published policy every this many steps (greedy accuracy on the evaluation
    split, in the step log as ``eval_accuracy`` and in ``treepo_learner_eval_accuracy``); 0 =
    never."""
    eval_dataset: str = ""
    """The evaluation split: a local ``.jsonl``/``.parquet`` file or ``save_to_disk`` directory
    with the training dataset's fields; empty = the built-in task's held-out split (with
    ``dataset = arith``)."""
    eval_size: int = Field(64, ge=1, le=1_000_000)
    """Problems of the evaluation split used (its first ones)."""
    eval_max_tokens: int = Field(64, ge=1, le=1_000_000)
    """Most tokens one evaluation answer may have."""
    dynamic_sampling: bool = True
    """Drop trees whose leaves all have the same reward (no signal)."""
    readmit_after_s: float = Field(300.0, gt=0, le=86_400)
    """A prompt whose tree has not arrived this long after its admission, and that is neither
    queued nor held by a live sampler, is admitted again (lost to a Redis crash, a lost XADD, a
    sampler that died after acking)."""
    readmit_stale: bool = True
    """Admit a prompt again when its tree is dropped as stale, so no prompt silently leaves the
    epoch; after ``max_admissions`` it is abandoned (counted)."""
    max_admissions: int = Field(4, ge=1, le=1000)
    """How often one prompt may be admitted (first admission included) before it is abandoned."""


class LossSettings(_Section):
    """TreePO loss and off-policy correction (see docs/algorithm.md)."""

    advantage: Literal["average", "size_weighted", "root"] = "average"
    """Tree advantage estimator."""
    clip_low: float = Field(0.2, gt=0, lt=1)
    """PPO lower clip epsilon."""
    clip_high: float = Field(0.28, gt=0, le=10)
    """PPO upper clip epsilon (clip-higher)."""
    dual_clip: float = Field(10.0, gt=1, le=1000)
    """Dual-clip constant for negative advantages."""
    is_level: Literal["token", "segment", "sequence"] = "segment"
    """Level of the behavior importance weight pi_prox/mu."""
    is_cap: float = Field(2.0, gt=0, le=1000)
    """Truncation of the behavior importance weight."""
    is_band: tuple[float, float] | None = None
    """Instead of truncating, mask tokens whose weight lies outside [lo, hi] (e.g. [0.5, 2])."""


CONFIG_FILE_ENV = "TREEPO_CONFIG_FILE"
"""Names a TOML settings file (as ``--config`` does); the environment overrides it."""
_config_file: ContextVar[Path | None] = ContextVar("treepo_config_file", default=None)


class ProcessSettings(BaseSettings):
    """The sections every process reads (one .env, or one TOML file, serves the whole run)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Command-line overrides, then the environment (``.env`` included), then the TOML
        file, then the defaults."""
        path = _config_file.get()
        toml = (TomlConfigSettingsSource(settings_cls, toml_file=path),) if path else ()
        return (init_settings, env_settings, dotenv_settings, file_secret_settings, *toml)

    redis: RedisSettings = RedisSettings()
    """Redis connection."""
    run: RunSettings = RunSettings()
    """Run identity and staleness bound."""
    streams: StreamSettings = StreamSettings()
    """Stream consumption."""
    weights: WeightSettings = WeightSettings()
    """Weight broadcast."""


class SamplerSettings(ProcessSettings):
    """Everything the sampler process reads."""

    tree: TreeConfig = TreeConfig()
    """TreePO tree shape and budget."""
    sampler: SamplerOptions = SamplerOptions()
    """Sampler process options."""


class LearnerSettings(ProcessSettings):
    """Everything the learner process reads."""

    loss: LossSettings = LossSettings()
    """Loss and importance correction."""
    learner: LearnerOptions = LearnerOptions()
    """Learner process options."""


PROCESS_SETTINGS: tuple[type[BaseSettings], ...] = (SamplerSettings, LearnerSettings)
S = TypeVar("S", bound=BaseSettings)


def known_env_names() -> set[str]:
    """Every ``TREEPO_*`` variable some process reads (whole sections and their fields)."""
    names: set[str] = {CONFIG_FILE_ENV}
    for cls in PROCESS_SETTINGS:
        for fname, finfo in cls.model_fields.items():
            top = f"{ENV_PREFIX}{fname.upper()}"
            names.add(top)
            sub = finfo.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                names.update(f"{top}__{s.upper()}" for s in sub.model_fields)
    return names


def unknown_env_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """``TREEPO_*`` variables in ``environ`` that no settings class declares (likely typos)."""
    env = os.environ if environ is None else environ
    known = known_env_names()
    return sorted(k for k in env if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def warn_unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Log a warning, with the closest known name, for every unknown ``TREEPO_*`` variable."""
    unknown = unknown_env_names(environ)
    known = sorted(known_env_names())
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        log.warning("unknown setting %s is ignored%s", name, hint)
    return unknown


def env_name(loc: tuple[Any, ...]) -> str:
    """The environment variable behind a pydantic error location, e.g. TREEPO_TREE__WIDTH."""
    parts = [str(p).upper() for p in loc if not isinstance(p, int)]
    return ENV_PREFIX + "__".join(parts[:2])


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of a ``.env`` file, read exactly as honcho reads them (a POSIX shell
    lexer: quotes keep spaces and backslashes, an unquoted value loses them, ``#`` starts a
    comment). A line honcho would silently skip is a ``ConfigError`` naming file and line."""
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            tokens = list(shlex.shlex(line, posix=True))
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from None
        if not tokens:
            continue
        if len(tokens) < 3 or tokens[1] != "=" or not _ENV_NAME.fullmatch(tokens[0]):
            raise ConfigError(f"{path}:{number}: not a NAME=value line: {line.strip()[:80]!r}")
        out[tokens[0]] = "".join(tokens[2:]).replace(r"\n", "\n").replace(r"\t", "\t")
    return out


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_env_file(path: Path) -> list[str]:
    """Put the variables of ``path`` into ``os.environ`` where the environment does not set them
    already (an explicit ``NAME=value treepo ...`` wins); returns the names it set."""
    added = [k for k in read_env_file(path).items() if k[0] not in os.environ]
    for name, value in added:
        os.environ[name] = value
    return [name for name, _ in added]


def config_file(path: str | Path | None = None) -> Path | None:
    """The TOML settings file: ``path`` (``--config``), else ``$TREEPO_CONFIG_FILE``, else
    none. A named file that is missing, is not TOML, or holds a section or key no process reads
    is a ``ConfigError`` naming it."""
    given = path if path is not None else os.environ.get(CONFIG_FILE_ENV) or None
    if given is None:
        return None
    file = Path(given)
    try:
        data = tomllib.loads(file.read_text())
    except OSError as exc:
        raise ConfigError(f"settings file {file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {file}: not TOML ({exc})") from None
    sections: dict[str, set[str]] = {}
    for cls in PROCESS_SETTINGS:
        for name, info in cls.model_fields.items():
            sub = info.annotation
            fields = (
                set(sub.model_fields)
                if isinstance(sub, type) and issubclass(sub, BaseModel)
                else set()
            )
            sections.setdefault(name, set()).update(fields)
    for section, body in data.items():
        if section not in sections:
            raise ConfigError(f"settings file {file}: unknown section [{section}]")
        if not isinstance(body, dict):
            raise ConfigError(f"settings file {file}: [{section}] must be a table")
        for key in body:
            if key not in sections[section]:
                close = difflib.get_close_matches(key, sorted(sections[section]), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"settings file {file}: unknown key {section}.{key}{hint}")
    return file


def load_settings(
    cls: type[S], warn: bool = True, config: str | Path | None = None, **overrides: Any
) -> S:
    """Build ``cls`` from the command-line ``overrides``, the environment and the TOML settings
    file (``config`` or ``$TREEPO_CONFIG_FILE``), in that order of precedence, warning about
    unknown ``TREEPO_*`` variables and turning validation failures into one ``ConfigError``
    that names each variable."""
    if warn:
        warn_unknown_env()
    token = _config_file.set(config_file(config))
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = [
            f"{env_name(e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        ]
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None
    finally:
        _config_file.reset(token)


def stream_key(run: RunSettings, what: str) -> str:
    """Name of one of the run's Redis keys, e.g. ``treepo:{default}:trees``."""
    return f"treepo:{{{run.name}}}:{what}"
