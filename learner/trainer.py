"""The HF causal LM under DeepSpeed, and one importance-corrected TreePO update on a batch.

``build_engine`` wraps the model with ``deepspeed.initialize`` (ZeRO stage, precision, gradient
accumulation, clipping from settings; a torch AdamW so no C++ op has to be built). On machines
without CUDA it selects DeepSpeed's CPU accelerator and the gloo backend. ``train_on_batch``
recomputes pi_prox once, then runs ``ppo_epochs`` x ``mini_batches`` updates. ``export_weights``
writes full weights (gathered under ZeRO-3) as safetensors in HF layout.
"""

from __future__ import annotations

import importlib
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from learner.batch import TrainBatch
from learner.logprobs import chunk_tokens, head_logprobs
from learner.loss import policy_loss
from learner.packing import HEAD_CHUNK_MB, added_tokens, packed_batch_logprobs, rows_by_tree
from learner.ranks import Control, control, free_port, rank, share
from pipeline.config import LearnerOptions, LossSettings

log = logging.getLogger(__name__)


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join (or, run alone, create) the torch.distributed group DeepSpeed needs, and the
    learner's control group (``learner.ranks``); a collective that waits ``timeout_s`` for a
    rank fails."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    # (``import deepspeed.comm.torch as m`` would bind torch itself: deepspeed.comm has ``torch``)
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op (used only by its
    # inference all-reduce) at every init, holding torch's extension lock file meanwhile, even
    # when the op is already built. A learner SIGKILLed in that moment leaves the lock behind and
    # every later learner on the machine waits on it forever. Training all-reduces go through
    # gloo (or NCCL): never build it.
    ds_comm.build_shm_op = lambda: None  # type: ignore[attr-defined]

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=timedelta(seconds=timeout_s),
        )
    control(timeout_s)


@dataclass
class Engine:
    """The DeepSpeed engine and what the learner needs beside it."""

    ds: Any
    """deepspeed.DeepSpeedEngine"""
    optimizer: torch.optim.Optimizer
    """The innermost torch optimizer (for checkpoints)."""
    zero_stage: int
    base_lr: float
    warmup_steps: int
    publish_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    """Tensor name -> the dtype of the base model's file: published weights are cast to it, so
    samplers (whose engines hold the base model) take every version whatever the training
    precision."""

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module  # type: ignore[no-any-return]

    def set_lr(self, step: int) -> float:
        lr = (
            self.base_lr * min(1.0, (step + 1) / self.warmup_steps)
            if self.warmup_steps
            else self.base_lr
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


@dataclass
class StepStats:
    """What one learner step measured: token-weighted means over its updates (see
    ``learner.loss.policy_loss``), tokens trained, optimizer updates, learning rate and the mean
    gradient norm before clipping."""

    tokens: float
    updates: float
    lr: float
    grad_norm: float
    loss: float = 0.0
    is_weight_mean: float = 1.0
    is_truncated_fraction: float = 0.0
    is_ess: float = 1.0
    clip_fraction: float = 0.0
    ratio_mean: float = 1.0
    approx_kl: float = 0.0
    tokens_computed: float = 0.0
    """Token positions the step's forward passes computed (packed: each tree token once)."""
    tokens_per_leaf: float = 0.0
    """What one padded row per leaf would have computed for the same passes (no padding)."""
    padding_fraction: float = 0.0
    """Share of the forwards' row positions that were padding (rows padded to the widest)."""


def ds_config(opts: LearnerOptions, precision: str | None = None) -> dict[str, Any]:
    precision = precision or (opts.precision if opts.precision != "auto" else "fp32")
    return {
        "train_micro_batch_size_per_gpu": 1,
        # by tokens the number of micro-batches varies: the trainer marks the boundary itself
        "gradient_accumulation_steps": 1
        if opts.micro_batch_tokens
        else opts.gradient_accumulation_steps,
        "gradient_clipping": opts.grad_clip,
        "zero_optimization": {
            "stage": opts.zero_stage,
            **(
                {"stage3_param_persistence_threshold": opts.zero3_persistence_threshold}
                if opts.zero_stage == 3
                else {}
            ),
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def attention_kernel(opts: LearnerOptions) -> str:
    """The attention implementation the learner loads the model with (``opts.attention``)."""
    if opts.attention != "auto":
        return opts.attention
    return "flex_attention" if torch.cuda.is_available() and opts.packing == "tree" else "sdpa"


SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


def base_dtypes(model_dir: str | Path) -> dict[str, torch.dtype]:
    """Tensor name -> torch dtype of the floating-point tensors of the base model's files."""
    from pipeline.weights.manifest import tensor_specs

    specs = tensor_specs(Path(model_dir))
    return {k: SAFETENSORS_DTYPES[d] for k, (d, _) in specs.items() if d in SAFETENSORS_DTYPES}


def resolve_precision(opts: LearnerOptions, dtypes: dict[str, torch.dtype]) -> str:
    """The training precision: ``opts.precision``, or for ``auto`` the base model's dtype on
    CUDA (bf16 for a bf16 model, fp16 for fp16) and fp32 on CPU (no fast bf16 matmuls here)."""
    if opts.precision != "auto":
        return opts.precision
    if not torch.cuda.is_available() or not dtypes:
        return "fp32"
    common = max(set(dtypes.values()), key=list(dtypes.values()).count)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(common, "fp32")


def build_engine(model_dir: str | Path, opts: LearnerOptions) -> Engine:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    init_distributed(opts.rank_timeout_s)
    import deepspeed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation=attention_kernel(opts)
    )
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    dtypes = base_dtypes(model_dir)
    precision = resolve_precision(opts, dtypes)
    ds, ds_opt, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(opts, precision)
    )
    inner = ds_opt
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    log.info("learner precision %s (weights published as the base model's dtypes)", precision)
    return Engine(ds, inner, opts.zero_stage, opts.lr, opts.warmup_steps, dtypes)


def _chunks(n: int, parts: int) -> list[torch.Tensor]:
    parts = max(1, min(parts, n))
    return [c for c in torch.arange(n, device="cpu").chunk(parts) if c.numel()]


STAT_KEYS = (
    "loss",
    "is_weight_mean",
    "is_truncated_fraction",
    "is_ess",
    "clip_fraction",
    "ratio_mean",
    "approx_kl",
)
"""``learner.loss.policy_loss`` statistics, token-weighted over every rank's micro-batches."""


def train_on_batch(
    engine: Engine,
    batch: TrainBatch,
    opts: LearnerOptions,
    loss: LossSettings,
    step: int,
    seed: int = 0,
) -> StepStats:
    """One learner step: recompute pi_prox (unless the step makes one update: ``one_update``),
    then ppo_epochs x mini_batches optimizer steps.

    On several ranks every rank holds the same whole batch and computes its share of each
    mini-batch's rows (and of pi_prox); each rank's loss is its rows' share of the mini-batch's
    token mean times the world size, so DeepSpeed's gradient average over the ranks is the
    whole mini-batch's gradient, whatever the number of ranks. Every rank makes the same number
    of forward/backward calls (empty ones where it has no rows left), as ZeRO's collectives
    need."""
    ds, ctl = engine.ds, control()
    batch = batch.to(next(ds.module.parameters()).device)
    lr = engine.set_lr(step)
    if one_update(opts, ds.module):
        # pi_prox is the policy the step starts from, and with one update that is the policy
        # its only forward computes: that forward's detached log-probs serve (no second pass)
        proximal: torch.Tensor | None = None
        computed = own = positions = 0.0
    else:
        ds.eval()
        with torch.no_grad():
            proximal, computed, own, positions = _proximal(ds.module, batch, opts, ctl)
    ds.train()
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
    tally = _Tally(
        work={"tokens_computed": computed, "tokens_per_leaf": own, "positions": positions}
    )
    updates = 0
    for _ in range(opts.ppo_epochs):
        order = _order(batch, opts, gen)
        for mb in _chunks(batch.rows, opts.mini_batches):
            _mini_batch(engine, batch, order[mb], proximal, opts, loss, tally)
            updates += 1
    summed = ctl.sum([tally.tokens, *tally.work.values(), *tally.totals.values()])
    work = dict(zip(tally.work, summed[1:4]))
    positions = work.pop("positions")
    work["padding_fraction"] = 1.0 - work["tokens_computed"] / positions if positions else 0.0
    norms = tally.norms
    return StepStats(
        tokens=float(batch.mask.sum().item()),
        updates=float(updates),
        lr=lr,
        grad_norm=sum(norms) / len(norms) if norms else float(ds.get_global_grad_norm() or 0.0),
        **{k: v / max(1.0, summed[0]) for k, v in zip(STAT_KEYS, summed[4:])},
        **work,
    )


@dataclass
class _Tally:
    """What a step's micro-batches add up on one rank (summed over the ranks at the end)."""

    work: dict[str, float]
    tokens: float = 0.0
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0.0))
    norms: list[float] = field(default_factory=list)

    def add(self, stats: dict[str, float]) -> None:
        """Token-weighted statistics of one micro-batch."""
        weight = stats["tokens"]
        self.tokens += weight
        for k in STAT_KEYS:
            self.totals[k] += stats[k] * weight


def _mini_batch(
    engine: Engine,
    batch: TrainBatch,
    everyone: torch.Tensor,
    proximal: torch.Tensor | None,
    opts: LearnerOptions,
    loss: LossSettings,
    tally: _Tally,
) -> None:
    """One optimizer step on the rows ``everyone`` (this rank computes its share of them)."""
    ds, ctl = engine.ds, control()
    rows = everyone[share(len(everyone), ctl.world, ctl.rank)]
    mb_tokens = float(batch.mask[everyone].sum().item())
    micro = micro_batches(batch, rows, opts)
    for _ in range(ctl.max(len(micro)) - len(micro)):  # as many calls as every rank
        micro.append(rows[:0])
    # each part's token sum over the whole mini-batch's tokens; DeepSpeed divides by its
    # accumulation steps and averages over the ranks itself
    factor = (1 if opts.micro_batch_tokens else opts.gradient_accumulation_steps) * ctl.world
    for i, part in enumerate(micro):
        last = i == len(micro) - 1
        if opts.micro_batch_tokens:
            ds.set_gradient_accumulation_boundary(last)
        pick = rows[part] if part.numel() else everyone[:1]  # an empty part computes one row x 0
        sub = batch.select(pick)
        prox = proximal[pick.to(proximal.device)] if proximal is not None else None
        lp_loss, stats, computed, width = _micro_loss(ds.module, sub, prox, loss, opts)
        scale = stats["tokens"] / max(1.0, mb_tokens) if part.numel() else 0.0
        ds.backward(lp_loss * scale * factor)
        if engine.zero_stage == 0 and ds.is_gradient_accumulation_boundary():
            tally.norms.append(_grad_norm(ds.module))
        if last or not opts.micro_batch_tokens:
            ds.step()
        if part.numel():
            tally.work["tokens_computed"] += computed
            tally.work["tokens_per_leaf"] += _real_tokens(sub)
            tally.work["positions"] += width
            tally.add(stats)


def one_update(opts: LearnerOptions, module: torch.nn.Module) -> bool:
    """Whether a step makes exactly one optimizer update with a deterministic forward (one PPO
    epoch, one mini-batch, no active dropout): then pi_prox needs no pass of its own."""
    if opts.ppo_epochs * opts.mini_batches != 1:
        return False
    config = getattr(module, "config", None)
    if any(
        float(getattr(config, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout")
    ):
        return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


def _proximal(
    module: torch.nn.Module, batch: TrainBatch, opts: LearnerOptions, ctl: Control
) -> tuple[torch.Tensor, float, float, float]:
    """pi_prox log-probs of every row, each rank computing a contiguous share (trees stay
    mostly whole) in the same token-budget micro-batches as training (``micro_batches``), and
    summing: ([rows, L-1], token positions this rank computed, the per-leaf tokens of its share,
    row positions its forwards took, padding included). Every rank makes as many forwards (ZeRO-3
    gathers parameters in each)."""
    mine = torch.arange(batch.rows, device="cpu")[share(batch.rows, ctl.world, ctl.rank)]
    micro = micro_batches(batch, mine, opts) if mine.numel() else []
    calls = ctl.max(len(micro))
    full = torch.zeros(batch.mask.shape, dtype=torch.float32, device=batch.mask.device)
    computed = positions = 0.0
    for i in range(calls):
        part = micro[i] if i < len(micro) else mine[:0]
        pick = mine[part] if part.numel() else torch.zeros(1, dtype=torch.long, device="cpu")
        lp, done, width = batch_logprobs(module, batch.select(pick), opts)
        if part.numel():
            full[pick.to(full.device)] = lp.to(full.dtype)
            computed, positions = computed + done, positions + width
    own = _real_tokens(batch.select(mine)) if mine.numel() else 0.0
    return ctl.sum_tensor(full), computed, own, positions


def micro_batches(
    batch: TrainBatch, rows: torch.Tensor, opts: LearnerOptions
) -> list[torch.Tensor]:
    """Positions in ``rows`` of each micro-batch: ``gradient_accumulation_steps`` equal parts
    (padded with empty ones), or consecutive groups of at most ``micro_batch_tokens`` token
    positions (a row that alone exceeds the budget is a group of its own)."""
    if not opts.micro_batch_tokens:
        gas = opts.gradient_accumulation_steps
        micro = _chunks(len(rows), gas)
        while len(micro) < gas:  # fewer rows than micro-batches: pad with empty steps
            micro.append(micro[-1][:0])
        return micro
    groups: list[list[int]] = [[]]
    used, seen = 0, {}  # seen: tree -> nodes already in the current group
    for pos, r in enumerate(rows.tolist()):
        cost = _row_cost(batch, r, seen, opts.packing)
        if groups[-1] and used + cost > opts.micro_batch_tokens:
            groups.append([])
            used, seen = 0, {}
            cost = _row_cost(batch, r, seen, opts.packing)
        groups[-1].append(pos)
        used += cost
        if opts.packing == "tree" and batch.row_leaf:
            t, leaf = batch.row_leaf[r]
            tree = batch.trees[t]
            seen.setdefault(t, set()).update(tree.path(tree.leaves[leaf].node))
    return [torch.tensor(g, dtype=torch.long, device="cpu") for g in groups]


def _row_cost(batch: TrainBatch, r: int, seen: dict[int, set[int]], packing: str) -> int:
    """Token positions row ``r`` adds to a micro-batch that already holds ``seen``."""
    if packing != "tree" or not batch.row_leaf:
        return int(batch.input_ids.shape[1])
    t, leaf = batch.row_leaf[r]
    return added_tokens(batch.trees[t], leaf, seen.get(t))


def _real_tokens(batch: TrainBatch) -> float:
    return float(batch.attention_mask.sum().item())


def _order(batch: TrainBatch, opts: LearnerOptions, gen: torch.Generator) -> torch.Tensor:
    """A random order of the rows; packed, the trees are shuffled and each tree's leaves stay
    together, so a mini-batch splits as few trees as possible."""
    if opts.packing == "leaf" or not batch.row_leaf:
        return torch.randperm(batch.rows, generator=gen, device="cpu")
    trees = torch.randperm(len(batch.trees), generator=gen, device="cpu").tolist()
    rows_of = rows_by_tree(batch.row_leaf)
    rows = [r for t in trees for r in rows_of.get(t, [])]
    return torch.tensor(rows, dtype=torch.long, device="cpu")


def row_budget(opts: LearnerOptions, module: torch.nn.Module) -> int:
    """Tokens a packed row may hold: ``pack_row_tokens``, or when unset under FlexAttention the
    micro-batch budget (its block mask skips what no query sees, so one long row costs no more
    attention than many and needs no padding); else 0 (rows as wide as the longest tree)."""
    if opts.pack_row_tokens:
        return opts.pack_row_tokens
    flex = getattr(module.config, "_attn_implementation", None) == "flex_attention"
    return opts.micro_batch_tokens if flex else 0


def batch_logprobs(
    module: torch.nn.Module, batch: TrainBatch, opts: LearnerOptions
) -> tuple[torch.Tensor, float, float]:
    """[rows, L-1] log-probs of the batch's targets under ``module`` (by the packed path unless
    ``opts.packing == "leaf"``), the real token positions the forward computed, and the row
    positions it took (padding included)."""
    if opts.packing == "tree" and batch.row_leaf:
        lp, packed = packed_batch_logprobs(
            module,
            batch.trees,
            batch.row_leaf,
            batch.mask,
            row_budget(opts, module),
            opts.head_chunk_mb,
        )
        return lp, float(packed.tokens), float(packed.group.numel())
    lp = token_logprobs(
        module, batch.input_ids, batch.attention_mask, batch.temperatures, opts.head_chunk_mb
    )
    return lp, _real_tokens(batch), float(batch.input_ids.numel())


def _micro_loss(
    module: torch.nn.Module,
    sub: TrainBatch,
    proximal: torch.Tensor | None,
    loss: LossSettings,
    opts: LearnerOptions,
) -> tuple[torch.Tensor, dict[str, float], float, float]:
    """The TreePO loss of one micro-batch under the current weights (and the token and row
    positions computed); ``proximal`` None: this forward's own detached log-probs."""
    logprobs, computed, width = batch_logprobs(module, sub, opts)
    value, stats = policy_loss(
        logprobs,
        logprobs.detach() if proximal is None else proximal,
        sub.behavior_logprobs,
        sub.advantages,
        sub.mask,
        sub.segment_ids,
        level=loss.is_level,
        clip_low=loss.clip_low,
        clip_high=loss.clip_high,
        dual_clip=loss.dual_clip,
        is_cap=loss.is_cap,
        is_band=loss.is_band,
    )
    return value, stats, computed, width


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    chunk_mb: int = HEAD_CHUNK_MB,
) -> torch.Tensor:
    """log p_T(token j+1 | tokens <= j) for every position: [rows, L-1], where p_T is the
    model's distribution at the row's sampling temperature (softmax of logits / T, as vLLM
    samples; ``None`` = temperature 1). The head runs in recomputed chunks
    (``learner.logprobs``) unless the model transforms its logits (soft-capping)."""
    rows, width = input_ids.shape
    device = input_ids.device
    temps = (
        torch.ones(rows, device=device)
        if temperatures is None
        else temperatures.to(device, torch.float32)
    )
    if getattr(model.config, "final_logit_softcapping", None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        logits = logits / temps.view(-1, 1, 1)
        targets = input_ids[:, 1:]
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    r = torch.arange(rows, device=device).repeat_interleave(width - 1)
    c = torch.arange(width - 1, device=device).repeat(rows)
    chunk = chunk_tokens(int(model.config.vocab_size), chunk_mb)
    lp = head_logprobs(
        model.get_output_embeddings(),
        hidden,
        r,
        c,
        input_ids[:, 1:].reshape(-1),
        temps.repeat_interleave(width - 1),
        chunk,
    )
    return lp.view(rows, width - 1)


def _grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of the full gradient before clipping (ZeRO stage 0: gradients are not sharded)."""
    total = sum(
        float(p.grad.detach().pow(2).sum()) for p in module.parameters() if p.grad is not None
    )
    return total**0.5


def full_parameters(engine: Engine, modifier_rank: int | None = None) -> Any:
    """A context in which every rank holds the full parameters (ZeRO-3 partitions them; with
    ``modifier_rank`` what that rank writes into them is kept). Every rank must enter it."""
    if engine.zero_stage != 3:
        return nullcontext()
    import deepspeed

    params = list(engine.module.parameters())
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def full_state_dict(engine: Engine) -> dict[str, torch.Tensor]:
    """Full parameters on every rank, as CPU copies (every rank must call it)."""
    with full_parameters(engine):
        return {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}


def save_pretrained(engine: Engine, directory: Path | None, weights_only: bool = False) -> None:
    """Write the model's full weights (and, unless ``weights_only``, its config) as an HF model
    directory (tied weights stored once, as the original checkpoint has them), each tensor in
    the base model's dtype. Every rank calls it; rank 0 writes (``directory`` may be None
    elsewhere)."""
    from transformers.utils import logging as hf_logging

    module: Any = engine.module
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one per version is two log lines of noise
    try:
        with full_parameters(engine):
            if rank() == 0 and directory is not None:
                module.save_pretrained(
                    str(directory), state_dict=_publish_state(engine), safe_serialization=True
                )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if weights_only and directory is not None and rank() == 0:
        for extra in directory.iterdir():  # the weight server serves weights only
            if not extra.name.endswith(".safetensors"):
                extra.unlink()


def _publish_state(engine: Engine) -> dict[str, torch.Tensor]:
    """The module's state in the base model's dtypes; tensors that share storage (tied
    embeddings) still share it after the cast, so they are saved once as the base has them."""
    state = engine.module.state_dict()

    def storage(name: str, v: torch.Tensor) -> Any:
        return (v.data_ptr(), tuple(v.shape)) if v.numel() else name

    dtype_of: dict[Any, torch.dtype] = {}
    for k, v in state.items():  # a storage takes the dtype of whichever of its names the base has
        if k in engine.publish_dtypes:
            dtype_of[storage(k, v)] = engine.publish_dtypes[k]
    cast: dict[Any, torch.Tensor] = {}
    for k, v in state.items():
        key = storage(k, v)
        if key not in cast:
            cast[key] = v.detach().to(dtype_of.get(key, v.dtype))
    return {k: cast[storage(k, v)] for k, v in state.items()}


def export_weights(engine: Engine, directory: Path | None) -> None:
    """The weights a sampler loads: HF-layout safetensors only."""
    save_pretrained(engine, directory, weights_only=True)
