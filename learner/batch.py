"""From TreeRollouts to training tensors.

Each leaf becomes one row: prompt + the leaf's response. Tensors are aligned with next-token
targets (length L - 1): position j holds what predicts token j + 1. Response positions carry the
behavior log-prob mu of the token (from the tree), the segment index of the token along its path
(for segment-level importance weights) and the leaf's advantage: the tree advantage of its mode,
whitened over all response tokens of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.treepo.advantage import AdvantageMode, tree_advantages, whiten
from pipeline.wire.messages import TreeRollout


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
    trees: list[TreeRollout] = field(default_factory=list)
    """The trees of the batch (the packed forward reads them)."""
    row_leaf: list[tuple[int, int]] = field(default_factory=list)
    """(tree index, leaf index) of each row."""

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
            self.trees,
            self.row_leaf,
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
            self.trees,
            [self.row_leaf[i] for i in idx],
        )


def _leaf_rows(tree: TreeRollout, paths: list[list[int]]) -> list[tuple[Any, Any, Any]]:
    """(tokens, behavior log-probs, segment index) arrays of each leaf's response."""
    rows = []
    for path in paths:
        nodes = [tree.nodes[n] for n in path]
        lengths = [len(n.token_ids) for n in nodes]
        tokens = np.concatenate([n.token_ids for n in nodes]) if nodes else np.zeros(0, np.int32)
        mus = np.concatenate([n.logprobs for n in nodes]) if nodes else np.zeros(0, np.float32)
        rows.append((tokens, mus, np.repeat(np.arange(len(nodes)), lengths)))
    return rows


def build_batch(
    trees: list[TreeRollout], mode: AdvantageMode = "average", pad_id: int = 0
) -> TrainBatch:
    """One row per leaf of every tree (the trees' order, then leaf order)."""
    rows: list[tuple[Any, tuple[Any, Any, Any]]] = []
    raw: list[float] = []
    rewards: list[float] = []
    temps: list[float] = []
    row_leaf: list[tuple[int, int]] = []
    for t, tree in enumerate(trees):
        if tree.top_p != 1.0:
            raise ValueError(f"tree {tree.tree_id}: sampled with top_p {tree.top_p} < 1")
        paths = [tree.path(leaf.node) for leaf in tree.leaves]
        temps += [tree.temperature] * len(paths)
        leaf_rewards = [leaf.reward for leaf in tree.leaves]
        raw.extend(tree_advantages(paths, leaf_rewards, mode))
        rewards.extend(leaf_rewards)
        rows += [(tree.prompt_token_ids, row) for row in _leaf_rows(tree, paths)]
        row_leaf += [(t, k) for k in range(len(paths))]
    if not rows:
        raise ValueError("no leaves to train on")
    counts = [len(tokens) for _, (tokens, _, _) in rows]
    adv = whiten(raw, counts)
    length = max(len(prompt) + len(tokens) for prompt, (tokens, _, _) in rows)
    r = len(rows)
    input_ids = np.full((r, length), pad_id, dtype=np.int64)
    attention = np.zeros((r, length), dtype=np.int64)
    mask = np.zeros((r, length - 1), dtype=np.float32)
    mu = np.zeros((r, length - 1), dtype=np.float32)
    seg = np.zeros((r, length - 1), dtype=np.int64)
    advantages = np.zeros((r, length - 1), dtype=np.float32)
    for i, (prompt, (tokens, mus, segs)) in enumerate(rows):
        p, n = len(prompt), len(tokens)
        input_ids[i, :p] = prompt
        input_ids[i, p : p + n] = tokens
        attention[i, : p + n] = 1
        lo, hi = p - 1, p - 1 + n  # targets of the response tokens
        mask[i, lo:hi] = 1
        mu[i, lo:hi] = mus
        seg[i, lo:hi] = segs
        advantages[i, lo:hi] = adv[i]
    temperatures = torch.tensor(temps, dtype=torch.float32, device="cpu")
    tensors = [torch.from_numpy(a) for a in (input_ids, attention, mask, mu, seg, advantages)]
    # on the CPU; the trainer moves it
    return TrainBatch(*tensors, rewards, raw, temperatures, list(trees), row_leaf)
