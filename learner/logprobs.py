"""Token log-probs from hidden states without keeping ``[tokens, vocab]`` logits for backward.

The vocabulary projection (the model's output head) and the log-softmax run over chunks of
tokens. Each chunk is an activation checkpoint (``torch.utils.checkpoint``, non-reentrant): its
forward keeps only the chunk's inputs (the hidden states it reads, indices, targets and
temperatures), and backward computes the chunk's logits again, one chunk at a time. So the
memory a step keeps for the head is ``O(tokens x hidden)``, not ``O(tokens x vocab)``, and the
transient is one chunk's logits and their gradient. The head is called as a module inside the
checkpoint, so ZeRO-3 gathers its weight in backward as it does in forward.

The chunk size is a memory budget, not a token count (``chunk_tokens``): a chunk holds about
four ``[chunk, vocab]`` float32 tensors at its peak in backward (logits, log-sum-exp input,
gradient, the head's output before the cast), so ``chunk = budget / (16 x vocab)`` tokens:
a 512 MB budget is 220 tokens of Qwen's 151,936-entry vocabulary and 680 of a 49,152 one.

What it does not do: logit soft-capping or anything else between the head and the log-softmax
(``learner.packing.check_model`` refuses such models for the packed path; the per-leaf path
falls back to the model's own logits for them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from learner.ranks import control

BYTES_PER_LOGIT = 16
"""Peak bytes one (token, vocab entry) pair costs inside a chunk's backward (four float32
tensors: see the module docstring)."""


def chunk_tokens(vocab: int, budget_mb: int) -> int:
    """Tokens per head chunk so that one chunk's transient stays within ``budget_mb``
    (at least 16, at most 65,536)."""
    return max(16, min(65_536, budget_mb * 2**20 // (BYTES_PER_LOGIT * max(1, vocab))))


def _chunk_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    target: torch.Tensor,
    temperature: torch.Tensor,
) -> torch.Tensor:
    """log p_T(target) of one chunk: the hidden states at (rows, cols) through the head."""
    logits = head(hidden[rows, cols]).float() / temperature.unsqueeze(-1)
    return logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def head_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    target: torch.Tensor,
    temperature: torch.Tensor,
    chunk: int,
    chunks: int | None = None,
) -> torch.Tensor:
    """[m] log-softmax(head(hidden[rows, cols]) / temperature)[target], computed in chunks of
    ``chunk`` tokens whose logits are recomputed in backward. Every rank calls the head as often
    (ZeRO-3 gathers its weight at every call): as many times as the rank that needs most, or
    ``chunks`` if more; extra calls compute nothing."""
    chunks = control().max(max(-(-len(target) // chunk), chunks or 0))
    device = hidden.device
    out = []
    for i in range(chunks):
        sl = slice(i * chunk, (i + 1) * chunk)
        args: tuple[Any, ...] = (
            head,
            hidden,
            rows[sl].to(device),
            cols[sl].to(device),
            target[sl].to(device),
            temperature[sl].to(device),
        )
        if torch.is_grad_enabled() and hidden.requires_grad:
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
