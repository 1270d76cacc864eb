"""From TreeRollouts to training tensors.

Each leaf becomes one row: prompt + the leaf's response. Tensors are aligned with next-token
targets (length L - 1): position j holds what predicts token j + 1. Response positions carry the
behavior log-prob mu of the token (from the tree), the segment index of the token along its path
(for segment-level importance weights) and the leaf's advantage: the tree advantage of its mode,
whitened over all response tokens of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.advantage import AdvantageMode, tree_advantages, whiten
from pipeline.messages import TreeRollout


@dataclass
class TrainBatch:
    input_ids: torch.Tensor
    """[rows, L] prompt + response, right-padded."""
    attention_mask: torch.Tensor
    """[rows, L] 1 on real tokens."""
    mask: torch.Tensor
    """[rows, L-1] 1 where the target is a response token."""
    behavior_logprobs: torch.Tensor
    """[rows, L-1] mu of each response target."""
    segment_ids: torch.Tensor
    """[rows, L-1] index of the target's segment along its path (0 = first segment)."""
    advantages: torch.Tensor
    """[rows, L-1] whitened tree advantage of the row's leaf."""
    rewards: list[float]
    raw_advantages: list[float]
    temperatures: torch.Tensor
    """[rows] sampling temperature of the row's tree (the learner's logits are divided by it)."""

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TrainBatch:
        """This batch with every tensor on ``device`` (the model's)."""
        return TrainBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.mask.to(device),
            self.behavior_logprobs.to(device),
            self.segment_ids.to(device),
            self.advantages.to(device),
            self.rewards,
            self.raw_advantages,
            self.temperatures.to(device),
        )

    def select(self, index: torch.Tensor) -> TrainBatch:
        """Rows ``index`` of this batch (for mini-batches)."""
        idx = index.tolist()
        index = index.to(self.input_ids.device)
        return TrainBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.mask[index],
            self.behavior_logprobs[index],
            self.segment_ids[index],
            self.advantages[index],
            [self.rewards[i] for i in idx],
            [self.raw_advantages[i] for i in idx],
            self.temperatures[index],
        )


def build_batch(
    trees: list[TreeRollout], mode: AdvantageMode = "average", pad_id: int = 0
) -> TrainBatch:
    """One row per leaf of every tree (the trees' order, then leaf order)."""
    rows: list[tuple[list[int], int, list[float], list[int]]] = []
    raw: list[float] = []
    rewards: list[float] = []
    temps: list[float] = []
    for tree in trees:
        if tree.top_p != 1.0:
            raise ValueError(f"tree {tree.tree_id}: sampled with top_p {tree.top_p} < 1")
        paths = [tree.leaf_path(leaf) for leaf in tree.leaves]
        temps += [tree.temperature] * len(paths)
        leaf_rewards = [leaf.reward for leaf in tree.leaves]
        raw.extend(tree_advantages(paths, leaf_rewards, mode))
        rewards.extend(leaf_rewards)
        for path in paths:
            tokens: list[int] = []
            mus: list[float] = []
            segs: list[int] = []
            for depth, node in enumerate(path):
                n = tree.nodes[node]
                tokens += n.token_ids
                mus += n.logprobs
                segs += [depth] * len(n.token_ids)
            rows.append((tree.prompt_token_ids + tokens, len(tree.prompt_token_ids), mus, segs))
    if not rows:
        raise ValueError("no leaves to train on")
    counts = [len(m) for _, _, m, _ in rows]
    adv = whiten(raw, counts)
    length = max(len(ids) for ids, _, _, _ in rows)
    r = len(rows)
    cpu = torch.device("cpu")  # built here, moved to the model's device by the trainer
    input_ids = torch.full((r, length), pad_id, dtype=torch.long, device=cpu)
    attention = torch.zeros((r, length), dtype=torch.long, device=cpu)
    mask = torch.zeros((r, length - 1), device=cpu)
    mu = torch.zeros((r, length - 1), device=cpu)
    seg = torch.zeros((r, length - 1), dtype=torch.long, device=cpu)
    advantages = torch.zeros((r, length - 1), device=cpu)
    for i, (ids, p, mus, segs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, device=cpu)
        attention[i, : len(ids)] = 1
        lo, hi = p - 1, p - 1 + len(mus)  # targets of the response tokens
        mask[i, lo:hi] = 1
        mu[i, lo:hi] = torch.tensor(mus, device=cpu)
        seg[i, lo:hi] = torch.tensor(segs, device=cpu)
        advantages[i, lo:hi] = adv[i]
    temperatures = torch.tensor(temps, dtype=torch.float32, device=cpu)
    return TrainBatch(input_ids, attention, mask, mu, seg, advantages, rewards, raw, temperatures)
