"""The segment tree of one prompt: nodes (segments), leaves (finished paths) and accounting.

A node is one segment of tokens generated under the context prompt + its ancestors' tokens.
``parent`` is None for the nodes directly under the prompt. A leaf is a node whose path ended;
leaves have no children. This module holds data and conversions to and from the wire message
``TreeRollout``; the algorithm that grows trees is in ``pipeline.sampling``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipeline.messages import RolloutLeaf, RolloutNode, RolloutStats, TreeRollout


@dataclass
class Node:
    """One segment."""

    id: int
    parent: int | None
    token_ids: list[int]
    logprobs: list[float]
    depth: int
    """1 for nodes directly under the prompt."""
    policy_version: int = 0


@dataclass
class Leaf:
    """One finished path from the prompt down to ``node_id``."""

    node_id: int
    path: list[int]
    """Node ids from the depth-1 node down to the leaf node."""
    response_token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    reward: float | None = None


TreeStats = RolloutStats
"""A tree's accounting is exactly what its wire message carries (one definition)."""


@dataclass
class Tree:
    prompt_token_ids: list[int]
    nodes: list[Node] = field(default_factory=list)
    leaves: list[Leaf] = field(default_factory=list)
    stats: TreeStats = field(default_factory=TreeStats)

    def path(self, node_id: int | None) -> list[int]:
        """Node ids from the depth-1 node down to ``node_id`` (empty for the prompt)."""
        path = []
        while node_id is not None:
            path.append(node_id)
            node_id = self.nodes[node_id].parent
        return path[::-1]

    def response_tokens(self, node_id: int | None) -> list[int]:
        """Tokens of the path ending at ``node_id`` (without the prompt)."""
        return [t for n in self.path(node_id) for t in self.nodes[n].token_ids]

    def children(self, node_id: int | None) -> list[int]:
        return [n.id for n in self.nodes if n.parent == node_id]

    def add_node(
        self,
        parent: int | None,
        token_ids: list[int],
        logprobs: list[float],
        policy_version: int = 0,
    ) -> Node:
        depth = 1 if parent is None else self.nodes[parent].depth + 1
        node = Node(len(self.nodes), parent, list(token_ids), list(logprobs), depth, policy_version)
        self.nodes.append(node)
        return node

    def add_leaf(self, node_id: int, finish_reason: str) -> Leaf:
        path = self.path(node_id)
        leaf = Leaf(
            node_id=node_id,
            path=path,
            response_token_ids=[t for n in path for t in self.nodes[n].token_ids],
            logprobs=[lp for n in path for lp in self.nodes[n].logprobs],
            finish_reason=finish_reason,
        )
        self.leaves.append(leaf)
        return leaf

    def recount(self) -> None:
        """Recompute the token counters and depth from nodes and leaves."""
        self.stats.decoded_tokens = sum(len(n.token_ids) for n in self.nodes)
        self.stats.independent_tokens = sum(len(leaf.response_token_ids) for leaf in self.leaves)
        self.stats.max_depth_reached = max((n.depth for n in self.nodes), default=0)

    def to_rollout(
        self,
        tree_id: str,
        prompt_id: str,
        sampler_id: str,
        dataset_position: int = 0,
        created_at: float = 0.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> TreeRollout:
        """The wire message for this tree (sampled at ``temperature``/``top_p``); every leaf must
        have its reward set."""
        missing = [i for i, leaf in enumerate(self.leaves) if leaf.reward is None]
        if missing:
            raise ValueError(f"leaves {missing} have no reward")
        return TreeRollout(
            tree_id=tree_id,
            prompt_id=prompt_id,
            sampler_id=sampler_id,
            prompt_token_ids=list(self.prompt_token_ids),
            nodes=[
                RolloutNode(
                    -1 if n.parent is None else n.parent, n.token_ids, n.logprobs, n.policy_version
                )
                for n in self.nodes
            ],
            leaves=[
                RolloutLeaf(leaf.node_id, float(leaf.reward or 0.0), leaf.finish_reason)
                for leaf in self.leaves
            ],
            stats=replace(self.stats),
            dataset_position=dataset_position,
            created_at=created_at,
            temperature=temperature,
            top_p=top_p,
        )

    @classmethod
    def from_rollout(cls, msg: TreeRollout) -> Tree:
        """Rebuild the tree of a decoded ``TreeRollout`` (validated by ``messages.decode``)."""
        tree = cls(list(msg.prompt_token_ids))
        for n in msg.nodes:
            tree.add_node(
                None if n.parent < 0 else n.parent, n.token_ids, n.logprobs, n.policy_version
            )
        for rl in msg.leaves:
            tree.add_leaf(rl.node, rl.finish_reason).reward = rl.reward
        tree.stats = replace(msg.stats)
        return tree
