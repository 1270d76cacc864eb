"""The canary of a weight version: the learner's log-probs of a short fixed token sequence under
the weights it publishes, written into the version's manifest (``Manifest.canary``). A sampler
scores the same tokens through its engine after swapping the version in and compares
(``workers/follow.py``): a swap that loaded nothing, or the wrong version, shows.

Every rank computes the same forward (under ZeRO-3 each gathers its parameters for it); the
module is put in eval mode for it (no dropout) and back.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.weights.manifest import Canary

CANARY_TEXT = "12+34=46;46+7=53;53+8=61;61+9=70;"
"""Digits and arithmetic: every tokenizer here (the toy's symbol-level one included) encodes it."""
CANARY_TOKENS = 24


def canary_tokens(tokenizer: Any, n: int = CANARY_TOKENS) -> list[int]:
    ids = [int(t) for t in tokenizer(CANARY_TEXT)["input_ids"]][:n]
    if len(ids) < 2:
        raise ValueError(f"the tokenizer encodes the canary text in {len(ids)} token(s)")
    return ids


@torch.no_grad()
def canary_logprobs(module: Any, token_ids: list[int]) -> list[float]:
    """``log p(token_ids[i] | token_ids[:i])`` for i >= 1 at temperature 1, in float64."""
    device = next(module.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    was_training = module.training
    module.eval()
    try:
        logits = module(input_ids=ids).logits[0, :-1].double()
    finally:
        module.train(was_training)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return [float(x) for x in logprobs.cpu()]


def make_canary(module: Any, token_ids: list[int]) -> Canary:
    return Canary(tuple(token_ids), tuple(canary_logprobs(module, token_ids)))
