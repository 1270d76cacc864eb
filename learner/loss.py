"""The TreePO policy loss with off-policy (behavior) importance correction.

Three policies: behavior mu (vLLM's log-probs stored in the tree), proximal pi_prox (the learner's
weights at the start of the step) and current pi_theta. Per response token t::

    r_t   = pi_theta / pi_prox                              (PPO ratio)
    pg_t  = max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high))
    pg_t  = min(pg_t, -A * dual_clip)         where A < 0   (dual clip)
    w_t   = pi_prox / mu, detached, at the chosen level:
              token:    w_t itself
              segment:  geometric mean of w over the tokens of t's segment (the tree's unit)
              sequence: geometric mean of w over the row's response tokens
            truncated at is_cap (or, with is_band=(lo, hi), tokens with w outside are masked)
    loss  = sum_t mask_t * w_t * pg_t / sum_t mask_t        (token mean, no KL, no entropy)
"""

from __future__ import annotations

from typing import Literal

import torch

Level = Literal["token", "segment", "sequence"]


def behavior_log_weights(
    proximal_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    mask: torch.Tensor,
    segment_ids: torch.Tensor,
    level: Level,
) -> torch.Tensor:
    """log(pi_prox / mu) per token, averaged in log space over the token's unit (detached)."""
    log_w = (proximal_logprobs - behavior_logprobs).detach() * mask
    if level == "token":
        return log_w
    if level == "sequence":
        per_row = log_w.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return per_row.expand_as(log_w)
    if level != "segment":
        raise ValueError(f"unknown importance level {level!r}")
    # mean over (row, segment) groups: one-hot scatter over segment ids
    # a row has at most one segment per position: no host sync to find the true count
    n_seg = max(1, segment_ids.shape[-1])
    seg = segment_ids.clamp(min=0).long()
    shape = (log_w.shape[0], n_seg)
    sums = torch.zeros(shape, dtype=log_w.dtype, device=log_w.device).scatter_add_(1, seg, log_w)
    counts = torch.zeros(shape, dtype=log_w.dtype, device=log_w.device)
    counts.scatter_add_(1, seg, mask.to(log_w.dtype))
    means = sums / counts.clamp(min=1)
    return means.gather(1, seg)


def policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    segment_ids: torch.Tensor,
    *,
    level: Level = "segment",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float = 10.0,
    is_cap: float = 2.0,
    is_band: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TreePO loss over [batch, tokens] tensors; returns (scalar loss, statistics)."""
    mask = valid = mask.to(logprobs.dtype)
    log_w = behavior_log_weights(proximal_logprobs, behavior_logprobs, mask, segment_ids, level)
    raw_w = torch.exp(log_w)
    if is_band is not None:
        inside = ((raw_w >= is_band[0]) & (raw_w <= is_band[1])).to(mask.dtype)
        weights, truncated = raw_w, (1 - inside) * mask
        mask = mask * inside
    else:
        weights = raw_w.clamp(max=is_cap)
        truncated = (raw_w > is_cap).to(mask.dtype) * mask
    ratio = torch.exp(logprobs - proximal_logprobs.detach())
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    dual = torch.minimum(pg, -advantages * dual_clip)
    pg = torch.where(advantages < 0, dual, pg)
    n = mask.sum().clamp(min=1)
    loss = (weights.detach() * pg * mask).sum() / n
    with torch.no_grad():
        w_sel = raw_w[mask > 0]
        ess = (
            (w_sel.sum() ** 2 / (w_sel.numel() * (w_sel**2).sum())).item() if w_sel.numel() else 1.0
        )
        stats = {
            "loss": loss.item(),
            "tokens": float(mask.sum().item()),
            "is_weight_mean": float(w_sel.mean().item()) if w_sel.numel() else 1.0,
            "is_truncated_fraction": float(truncated.sum().item() / max(1.0, valid.sum().item())),
            "is_ess": float(ess),
            "clip_fraction": float((((pg2 > pg1).to(mask.dtype)) * mask).sum().item() / n.item()),
            "ratio_mean": float((ratio * mask).sum().item() / n.item()),
            "approx_kl": float(((proximal_logprobs - logprobs) * mask).sum().item() / n.item()),
        }
    return loss, stats
