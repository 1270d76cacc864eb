"""policy_loss against an independent per-token computation; batch building."""

from __future__ import annotations

import math

import pytest
import torch

from learner.batch import build_batch
from learner.loss import policy_loss
from pipeline.treepo.advantage import tree_advantages, whiten
from pipeline.wire.messages import RolloutLeaf, RolloutNode, TreeRollout


def reference_loss(lp, prox, mu, adv, mask, seg, level, clip_low, clip_high, dual_clip, is_cap):  # type: ignore[no-untyped-def]
    """Plain Python loops over tokens, written from the formula in learner/loss.py's docstring."""
    rows, cols = len(lp), len(lp[0])
    total, count = 0.0, 0
    for i in range(rows):
        valid = [j for j in range(cols) if mask[i][j]]
        for j in valid:
            if level == "token":
                logw = prox[i][j] - mu[i][j]
            elif level == "segment":
                same = [k for k in valid if seg[i][k] == seg[i][j]]
                logw = sum(prox[i][k] - mu[i][k] for k in same) / len(same)
            else:
                logw = sum(prox[i][k] - mu[i][k] for k in valid) / len(valid)
            w = min(math.exp(logw), is_cap)
            r = math.exp(lp[i][j] - prox[i][j])
            a = adv[i][j]
            pg = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
            if a < 0:
                pg = min(pg, -a * dual_clip)
            total += w * pg
            count += 1
    return total / max(count, 1)


def random_case(seed: int, rows: int = 3, cols: int = 9):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(rows, cols, generator=g) * 2
    prox = lp + (torch.rand(rows, cols, generator=g) - 0.5) * 1.2
    mu = prox + (torch.rand(rows, cols, generator=g) - 0.5) * 2.0
    adv = (torch.rand(rows, 1, generator=g) - 0.5).expand(rows, cols) * 4
    mask = (torch.rand(rows, cols, generator=g) > 0.2).float()
    mask[:, 0] = 1
    seg = torch.div(torch.arange(cols), 3, rounding_mode="floor").expand(rows, cols).clone()
    return lp, prox, mu, adv.contiguous(), mask, seg


@pytest.mark.parametrize("level", ["token", "segment", "sequence"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_per_token_reference(level: str, seed: int) -> None:
    lp, prox, mu, adv, mask, seg = random_case(seed)
    loss, stats = policy_loss(lp, prox, mu, adv, mask, seg, level=level)  # type: ignore[arg-type]
    ref = reference_loss(
        lp.tolist(),
        prox.tolist(),
        mu.tolist(),
        adv.tolist(),
        mask.tolist(),
        seg.tolist(),
        level,
        0.2,
        0.28,
        10.0,
        2.0,
    )
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert stats["tokens"] == mask.sum().item()


def test_weights_are_exactly_one_when_mu_equals_prox() -> None:
    lp, prox, _, adv, mask, seg = random_case(1)
    for level in ("token", "segment", "sequence"):
        _, stats = policy_loss(lp, prox, prox.clone(), adv, mask, seg, level=level)  # type: ignore[arg-type]
        assert stats["is_weight_mean"] == 1.0
        assert stats["is_truncated_fraction"] == 0.0
        assert stats["is_ess"] == pytest.approx(1.0)


def test_segment_level_is_the_geometric_mean_over_the_segment() -> None:
    from learner.loss import behavior_log_weights

    prox = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    mu = torch.tensor([[-1.5, -0.5, -3.0, -1.0]])  # log w = 0.5, -0.5 | 2.0, 0.0
    seg = torch.tensor([[0, 0, 1, 1]])
    mask = torch.ones(1, 4)
    w = torch.exp(behavior_log_weights(prox, mu, mask, seg, "segment"))
    expected = [math.sqrt(math.exp(0.5) * math.exp(-0.5))] * 2 + [
        math.sqrt(math.exp(2.0) * 1.0)
    ] * 2
    assert w[0].tolist() == pytest.approx(expected)


def test_clipping_engages_where_it_should() -> None:
    prox = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 20.0]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    seg = torch.zeros(1, 4, dtype=torch.long)
    lp.requires_grad_(True)
    loss, stats = policy_loss(lp, prox, prox, adv, mask, seg, level="token")
    # token 0: A>0, r=1.5 > 1.28 clipped -> no gradient; token 1: A<0, r=0.5 < 0.8 clipped -> none
    # token 2: inside the band -> gradient; token 3: A<0, r=20 > dual clip 10 -> constant, none
    loss.backward()
    grad = lp.grad[0].tolist()
    assert grad[0] == 0 and grad[1] == 0 and grad[3] == 0 and grad[2] != 0
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 1.1 + 10.0) / 4)
    assert stats["clip_fraction"] == pytest.approx(0.5)  # tokens 0 and 1 take the clipped branch


def test_truncation_and_band() -> None:
    lp = prox = torch.zeros(1, 3)
    mu = torch.log(torch.tensor([[0.1, 1.0, 4.0]]))  # w = 10, 1, 0.25
    adv = torch.ones(1, 3)
    mask = torch.ones(1, 3)
    seg = torch.zeros(1, 3, dtype=torch.long)
    loss, stats = policy_loss(lp, prox, mu, adv, mask, seg, level="token", is_cap=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 1.0 + 0.25) / 3)
    assert stats["is_truncated_fraction"] == pytest.approx(1 / 3)
    loss, stats = policy_loss(lp, prox, mu, adv, mask, seg, level="token", is_band=(0.5, 2.0))
    assert loss.item() == pytest.approx(-1.0)  # only the middle token survives
    assert stats["tokens"] == 1


def test_gradients_are_zero_for_filtered_tokens() -> None:
    lp, prox, mu, adv, mask, seg = random_case(3)
    lp.requires_grad_(True)
    loss, _ = policy_loss(lp, prox, mu, adv, mask, seg)
    loss.backward()
    assert torch.all(lp.grad[mask == 0] == 0)
    assert torch.any(lp.grad[mask == 1] != 0)


def test_build_batch_alignment_and_advantages() -> None:
    # prompt [7, 8]; n0 = [1, 2] then leaves n1 = [3, 0] (+1) and n2 = [4] (-1)
    tree = TreeRollout(
        [7, 8],
        [
            RolloutNode(-1, [1, 2], [-0.1, -0.2], 0),
            RolloutNode(0, [3, 0], [-0.3, -0.4], 0),
            RolloutNode(0, [4], [-0.5], 1),
        ],
        [RolloutLeaf(1, 1.0, "eos"), RolloutLeaf(2, -1.0, "depth")],
        tree_id="t",
    )
    b = build_batch([tree], "average")
    assert b.input_ids.tolist() == [[7, 8, 1, 2, 3, 0], [7, 8, 1, 2, 4, 0]]
    assert b.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 1, 0]]
    # targets: position j predicts token j+1; the response starts at target index 1
    assert b.mask.tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert b.behavior_logprobs[0].tolist() == pytest.approx([0, -0.1, -0.2, -0.3, -0.4])
    assert b.segment_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    raw = tree_advantages([[0, 1], [0, 2]], [1.0, -1.0], "average")
    expected = whiten(raw, [4, 3])
    assert b.advantages[0, 1].item() == pytest.approx(expected[0])
    assert b.advantages[1, 3].item() == pytest.approx(expected[1])
    assert b.advantages[1, 4].item() == 0.0
