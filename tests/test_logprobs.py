"""The chunked, recomputed head (``learner.logprobs``) against the plain full-logits
log-softmax: values and gradients, chunk sizes that do and do not divide the tokens, and the
memory it keeps for backward (no ``[tokens, vocab]`` tensor among autograd's saved tensors)."""

from __future__ import annotations

import pytest
import torch

from learner.logprobs import chunk_tokens, head_logprobs


def _setup(seed: int, vocab: int = 97, hidden: int = 16, rows: int = 3, width: int = 21):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    states = torch.randn(rows, width, hidden, generator=g, requires_grad=True)
    m = 40
    r = torch.randint(0, rows, (m,), generator=g)
    c = torch.randint(0, width, (m,), generator=g)
    target = torch.randint(0, vocab, (m,), generator=g)
    temp = torch.rand(m, generator=g) + 0.5
    return head, states, r, c, target, temp


def _reference(head, states, r, c, target, temp):  # type: ignore[no-untyped-def]
    logits = head(states[r, c]).double() / temp.double().unsqueeze(-1)
    return torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 7, 16, 40, 1000])
def test_chunked_logprobs_and_gradients_equal_the_full_softmax(chunk: int) -> None:
    head, states, r, c, target, temp = _setup(chunk)
    weights = torch.randn(len(target), generator=torch.Generator().manual_seed(1))

    def grads(fn):  # type: ignore[no-untyped-def]
        head.zero_grad()
        states.grad = None
        lp = fn()
        (lp.double() * weights.double()).sum().backward()
        return lp.detach().double(), states.grad.clone(), head.weight.grad.clone()

    want = grads(lambda: _reference(head, states, r, c, target, temp))
    got = grads(lambda: head_logprobs(head, states, r, c, target, temp, chunk, chunks=9))
    for w, g in zip(want, got):
        assert torch.allclose(g.double(), w.double(), atol=1e-5, rtol=1e-5), (g - w).abs().max()


def test_backward_keeps_no_vocabulary_wide_tensor() -> None:
    """Autograd's saved tensors of the chunked head hold nothing of vocab width: the logits are
    recomputed in backward (the plain softmax keeps [tokens, vocab] alive)."""
    vocab = 5000
    head, states, r, c, target, temp = _setup(0, vocab=vocab)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = head_logprobs(head, states, r, c, target, temp, 16)
    assert saved and all(vocab not in shape for shape in saved), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _reference(head, states, r, c, target, temp)
    assert any(vocab in shape for shape in saved)  # the check can fail
    lp.sum().backward()
    assert states.grad is not None and head.weight.grad is not None


def test_chunk_size_follows_the_memory_budget() -> None:
    assert chunk_tokens(151_936, 512) == 512 * 2**20 // (16 * 151_936)  # 220 tokens
    assert chunk_tokens(49_152, 512) == 682
    assert chunk_tokens(10**9, 16) == 16  # never below 16
    assert chunk_tokens(15, 512) == 65_536  # nor above 65,536
