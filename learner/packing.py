"""Tree-packed forward: every token of a tree is computed once, in forward and in backward.

A tree becomes one packed sequence: its prompt once, then the tokens of each node once (nodes
in index order, so parents come before their children). Token q may attend token k when k's node
is q's node or one of its ancestors (the prompt is everyone's ancestor) and k does not come after
q. Position ids are positions along the token's own path, so they equal those of the per-leaf
row. Several trees share a packed row up to a token budget, with no padding between them;
attention never crosses trees. Each response token is predicted from the hidden state of the
token before it on its path (the last token of its parent path for a node's first token), and
its log-prob is computed once however many leaves pass through it; a leaf's log-probs are then
a gather of those, so the per-leaf loss keeps its definition (a shared token contributes once
per leaf, with that leaf's advantage) and autograd sums the shared gradient.

The attention is kept as an O(T) *group layout*: each position's group (the prompt or one node
of one tree) and which groups each group sees. From it come the masks the kernels take
(``TREEPO_LEARNER__ATTENTION``): a dense 4-D mask for the model's SDPA attention (boolean) or
eager attention (additive: 0 or the dtype's lowest value), where every pair of a row is computed
and the disallowed ones masked (a row costs its length squared), and on CUDA a FlexAttention
``BlockMask`` built from the group layout block by block (``block_layout``), so no [T, T]
tensor exists and blocks nobody attends are skipped. All are checked against the per-leaf path
(the block mask on CPU forward here, forward and backward on CUDA in tests/test_devices.py).
Trees fill rows first fit in decreasing length up to max(row budget, the longest tree), so rows
are about equally wide (``PackedBatch.padding_fraction`` says how much is padding).

The vocabulary projection runs in chunks whose logits are recomputed in backward
(``learner.logprobs``), so no ``[tokens, vocab]`` tensor is kept for backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from learner.logprobs import chunk_tokens, head_logprobs
from pipeline.wire.messages import TreeRollout

SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take the tree mask: a dense 4-D mask (boolean for SDPA,
additive for eager) or a FlexAttention ``BlockMask`` (flash-attention takes neither)."""

HEAD_CHUNK_MB = 512
"""Default memory budget of one head chunk (``learner.logprobs.chunk_tokens``)."""


@dataclass
class PackedTree:
    """One tree (or the part of it that some leaves need), laid out as a packed sequence."""

    tokens: np.ndarray
    """[n] token ids: the prompt, then each needed node's tokens."""
    positions: np.ndarray
    """[n] position of each token along its own path."""
    predictor: np.ndarray
    """[n] index of the token whose hidden state predicts this one (-1 for prompt tokens)."""
    leaf_tokens: list[np.ndarray]
    """Per requested leaf: indices of its response tokens in this sequence, in path order."""
    temperature: float
    groups: list[tuple[int, int, np.ndarray]]
    """(first token, tokens, indices of the earlier tokens it sees) of the prompt and of each
    non-empty node: a group's tokens see those and, causally, each other."""

    def allowed(self) -> np.ndarray:
        """[n, n] True where query token q may attend key token k."""
        n = len(self.tokens)
        mask = np.zeros((n, n), dtype=bool)
        for q, k, before in self.groups:
            mask[q : q + k, before] = True
            mask[q : q + k, q : q + k] = np.tri(k, dtype=bool)
        return mask

    def group_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """([n] group of each token, [g, g] True where group a sees group b): the same
        attention as ``allowed`` in O(n + g^2) (a token sees the earlier tokens of the groups
        its group sees)."""
        group = np.zeros(len(self.tokens), np.int64)
        for g, (q, k, _) in enumerate(self.groups):
            group[q : q + k] = g
        sees = np.eye(len(self.groups), dtype=bool)
        for g, (_, _, before) in enumerate(self.groups):
            sees[g, np.unique(group[before])] = True
        return group, sees


def pack_tree(tree: TreeRollout, leaves: list[int] | None = None) -> PackedTree:
    """The packed layout of ``tree`` restricted to the paths of ``leaves`` (leaf indices; all
    when None)."""
    chosen = range(len(tree.leaves)) if leaves is None else leaves
    paths = [tree.path(tree.leaves[i].node) for i in chosen]
    needed = sorted({n for p in paths for n in p})
    prompt = tree.prompt_token_ids
    if len(prompt) == 0:
        raise ValueError(f"tree {tree.tree_id}: an empty prompt cannot be packed")
    parts, positions, predictor = [prompt], [np.arange(len(prompt))], []
    predictor.append(np.full(len(prompt), -1, np.int64))
    start: dict[int, int] = {}
    last = {-1: len(prompt) - 1}  # index of the last token of the path ending at a node
    depth_len = {-1: 0}  # response tokens on the path ending at a node
    cursor = len(prompt)
    seen_before = {-1: np.arange(len(prompt))}  # keys a node's tokens see before their own
    groups = [(0, len(prompt), np.zeros(0, np.int64))]
    for node in needed:
        parent = tree.nodes[node].parent
        k = len(tree.nodes[node].token_ids)
        start[node] = cursor
        parts.append(tree.nodes[node].token_ids)
        positions.append(len(prompt) + depth_len[parent] + np.arange(k))
        pred = np.arange(cursor - 1, cursor + k - 1)
        if k:
            pred[0] = last[parent]
        predictor.append(pred)
        depth_len[node] = depth_len[parent] + k
        last[node] = cursor + k - 1 if k else last[parent]
        before = seen_before[-1] if parent == -1 else seen_before[parent]
        if k:
            groups.append((cursor, k, before))
        seen_before[node] = np.concatenate([before, np.arange(cursor, cursor + k)])
        cursor += k
    leaf_tokens = [
        np.concatenate(
            [np.arange(start[n], start[n] + len(tree.nodes[n].token_ids)) for n in p]
            or [np.zeros(0, np.int64)]
        )
        for p in paths
    ]
    return PackedTree(
        np.concatenate(parts).astype(np.int64),
        np.concatenate(positions),
        np.concatenate(predictor),
        leaf_tokens,
        float(tree.temperature),
        groups,
    )


@dataclass
class PackedBatch:
    """Trees packed into rows; ``leaf_index`` maps every requested leaf to its tokens."""

    input_ids: torch.Tensor
    """[rows, T] token ids (0 after the last tree of a row)."""
    position_ids: torch.Tensor
    """[rows, T]"""
    group: torch.Tensor
    """[rows, T] attention group of each position (the prompt or one node of one tree; the
    padding at a row's end is a group of its own)."""
    sees: torch.Tensor
    """[rows, G, G] True where group a may attend group b (causally: earlier positions)."""
    pred_row: torch.Tensor
    """[m] row of each response token computed (m = response tokens packed)."""
    pred_col: torch.Tensor
    """[m] column of the hidden state that predicts it."""
    target: torch.Tensor
    """[m] its token id."""
    temperature: torch.Tensor
    """[m] its tree's sampling temperature."""
    leaf_index: list[torch.Tensor]
    """Per requested leaf: indices into the m computed tokens, in path order."""
    tokens: int
    """Real tokens in the packed rows (prompts + responses, each once)."""

    @property
    def attention(self) -> torch.Tensor:
        """[rows, 1, T, T] True where query may attend key: the dense mask of SDPA (one byte a
        pair, built row by row from the group layout without a wider intermediate)."""
        rows, width = self.group.shape
        out = torch.empty((rows, 1, width, width), dtype=torch.bool, device=self.group.device)
        for r in range(rows):
            g = self.group[r]
            seen = self.sees[r][g]  # [T, G]: what each query's group sees
            torch.gather(seen, 1, g.unsqueeze(0).expand(width, width), out=out[r, 0])
            out[r, 0].tril_()
        return out

    def additive_attention(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense mask as 0 / the dtype's lowest value, added to the scores: the form
        transformers' *eager* attention takes (it adds a boolean mask as 0/1)."""
        allowed = self.attention
        out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)

    @property
    def padding_fraction(self) -> float:
        """Share of the rows' positions that hold no token (padding at the rows' ends)."""
        positions = self.group.numel()
        return 1.0 - self.tokens / positions if positions else 0.0

    def mask_mod(self, device: torch.device) -> Any:
        """FlexAttention's ``mask_mod`` of this attention, reading the O(T) group layout."""
        group, sees = self.group.to(device), self.sees.to(device)

        def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (kv <= q) & sees[b, group[b, q], group[b, kv]]

        return mask_mod

    def block_mask(self, device: torch.device, block: int = 128) -> Any:
        """The same attention as a FlexAttention ``BlockMask``, built from the group layout
        (``block_layout``): no dense [T, T] mask is ever made, and blocks no query of which may
        see are skipped, not computed."""
        from torch.nn.attention.flex_attention import BlockMask

        partial, full = self.block_layout(block)
        width = self.group.shape[1]

        def indices(which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            counts = which.sum(-1, dtype=torch.int32)
            order = torch.argsort(which.to(torch.int8), dim=-1, descending=True, stable=True)
            return counts.unsqueeze(1).to(device), order.to(torch.int32).unsqueeze(1).to(device)

        kv_num, kv_idx = indices(partial)
        full_num, full_idx = indices(full)
        return BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=block,
            mask_mod=self.mask_mod(device),
            seq_lengths=(width, width),
        )

    def block_layout(self, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """([rows, nb, nb] partial, [rows, nb, nb] full) block pairs (query block, key block)
        of the attention, from the group layout in O(nb x G + nb^2) per row (nb blocks of
        ``block`` positions, G groups): a key block earlier than the query block is full when
        every group in the query block sees every group in the key block and partial when
        some does but not all; the diagonal block is always partial (causal inside it); later
        key blocks are empty; a block the row's end cuts is never full (torch's convention)."""
        rows, width = self.group.shape
        nb = -(-width // block)
        groups = self.sees.shape[1]
        which = torch.arange(width, device=self.group.device) // block
        below = torch.ones(nb, nb, dtype=torch.bool, device=self.group.device).tril(-1)
        diagonal = torch.eye(nb, dtype=torch.bool, device=self.group.device)
        partial = torch.zeros((rows, nb, nb), dtype=torch.bool, device=self.group.device)
        full = torch.zeros_like(partial)
        for r in range(rows):
            inc = torch.zeros((nb, groups), dtype=torch.float32, device=self.group.device)
            inc[which, self.group[r]] = 1.0  # block x group: the block holds the group
            sees = self.sees[r].float()
            some = (inc @ sees @ inc.T) > 0
            not_all = (inc @ (1.0 - sees) @ inc.T) > 0
            full[r] = below & some & ~not_all
            partial[r] = (below & some & not_all) | diagonal
        if width % block:  # a block cut by the row's end is never full (as torch counts it)
            edge = torch.zeros(nb, nb, dtype=torch.bool, device=self.group.device)
            edge[-1, :] = edge[:, -1] = True
            partial |= full & edge
            full &= ~edge
        return partial, full


def _fill_rows(lengths: list[int], budget: int) -> tuple[list[list[int]], list[int]]:
    """Sequences grouped into rows of at most max(``budget``, the longest) tokens, first fit
    in decreasing length (each row in the sequences' order): so rows are about equally wide and
    few positions are padding. ``budget`` 0 fills rows up to the longest sequence, which costs
    no more attention than one sequence a row (every row is as wide as the widest anyway)."""
    cap = max([budget, *lengths])
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, u in enumerate(used) if u + lengths[i] <= cap), None)
        if slot is None:
            rows.append([i])
            used.append(lengths[i])
        else:
            rows[slot].append(i)
            used[slot] += lengths[i]
    return [sorted(r) for r in rows], used


def _cat(parts: list[Any], dtype: Any) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, device="cpu")
    return torch.from_numpy(np.concatenate(parts).astype(dtype))


def pack(
    trees: list[TreeRollout], leaves: list[list[int]] | None = None, row_tokens: int = 0
) -> PackedBatch:
    """Pack ``trees`` (``leaves[i]``: the leaves of tree i to compute; all when None) into rows
    of at most max(``row_tokens``, the longest tree) tokens (``_fill_rows``). Leaves come back in
    the order given."""
    packed = [pack_tree(t, None if leaves is None else leaves[i]) for i, t in enumerate(trees)]
    rows, used = _fill_rows([len(p.tokens) for p in packed], row_tokens)
    width, r, cpu = max(used), len(rows), torch.device("cpu")
    input_ids = torch.zeros((r, width), dtype=torch.long, device=cpu)
    position_ids = torch.zeros((r, width), dtype=torch.long, device=cpu)
    layouts = [p.group_layout() for p in packed]
    per_row = [sum(len(layouts[i][1]) for i in members) + 1 for members in rows]  # + padding
    group = torch.zeros((r, width), dtype=torch.long, device=cpu)
    sees = torch.zeros((r, max(per_row), max(per_row)), dtype=torch.bool, device=cpu)
    pr, pc, tg, tp, computed_at = [], [], [], [], {}
    m = 0
    for row, members in enumerate(rows):
        offset, first = 0, 0  # first: this tree's first group in the row
        for i in members:
            p = packed[i]
            n = len(p.tokens)
            sl = slice(offset, offset + n)
            input_ids[row, sl] = torch.from_numpy(p.tokens)
            position_ids[row, sl] = torch.from_numpy(p.positions)
            tree_group, tree_sees = layouts[i]
            g = len(tree_sees)
            group[row, sl] = torch.from_numpy(tree_group + first)
            sees[row, first : first + g, first : first + g] = torch.from_numpy(tree_sees)
            first += g
            response = np.nonzero(p.predictor >= 0)[0]
            pr.append(np.full(len(response), row))
            pc.append(p.predictor[response] + offset)
            tg.append(p.tokens[response])
            tp.append(np.full(len(response), p.temperature, np.float32))
            slot = np.full(n, -1, np.int64)
            slot[response] = m + np.arange(len(response))
            computed_at[i] = slot
            m += len(response)
            offset += n
        group[row, offset:] = first  # the padding: a group that sees only itself
        sees[row, first, first] = True
    leaf_index = [
        torch.from_numpy(computed_at[i][idx]) for i, p in enumerate(packed) for idx in p.leaf_tokens
    ]

    return PackedBatch(
        input_ids,
        position_ids,
        group,
        sees,
        _cat(pr, np.int64),
        _cat(pc, np.int64),
        _cat(tg, np.int64),
        _cat(tp, np.float32),
        leaf_index,
        sum(used),
    )


def rows_by_tree(row_leaf: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Tree index -> its rows (per-leaf layout, ``row_leaf[r] = (tree, leaf)``), in first-seen
    tree order."""
    rows_of: dict[int, list[int]] = {}
    for r, (t, _) in enumerate(row_leaf):
        rows_of.setdefault(t, []).append(r)
    return rows_of


def added_tokens(tree: TreeRollout, leaf: int, packed: set[int] | None) -> int:
    """Token positions leaf ``leaf`` adds to a packed sequence already holding the nodes
    ``packed`` of its tree (None: the tree is not in it yet, so its prompt comes too)."""
    held = packed or set()
    new = [n for n in tree.path(tree.leaves[leaf].node) if n not in held]
    prompt = 0 if packed is not None else len(tree.prompt_token_ids)
    return prompt + sum(len(tree.nodes[n].token_ids) for n in new)


def check_model(model: torch.nn.Module) -> None:
    """Refuse models the packed forward would compute wrongly: attention that ignores a custom
    4-D mask, logits that are not a plain projection of the last hidden state, sliding-window
    attention layers."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"tree packing needs attention that takes a 4-D mask ({', '.join(SUPPORTED_ATTENTION)}"
            f"); the model uses {impl!r}: set TREEPO_LEARNER__PACKING=leaf"
        )
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(
            "tree packing does not support final_logit_softcapping models: "
            "set TREEPO_LEARNER__PACKING=leaf"
        )
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise ValueError(
            "tree packing does not support sliding-window attention layers: "
            "set TREEPO_LEARNER__PACKING=leaf"
        )


def dense_mask(model: torch.nn.Module, batch: PackedBatch, device: torch.device) -> Any:
    """The attention mask the model's kernel takes: a FlexAttention ``BlockMask``, an additive
    float mask for eager attention, or the boolean mask for SDPA."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "flex_attention":
        return batch.block_mask(device)
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return batch.additive_attention(dtype).to(device)
    return batch.attention.to(device)


def packed_token_logprobs(
    model: torch.nn.Module, batch: PackedBatch, chunk_mb: int = HEAD_CHUNK_MB
) -> torch.Tensor:
    """[m] log p_T(token | its path) of every packed response token, each computed once (the
    head in recomputed chunks: ``learner.logprobs``)."""
    device = next(model.parameters()).device
    hidden = model.base_model(
        input_ids=batch.input_ids.to(device),
        attention_mask=dense_mask(model, batch, device),
        position_ids=batch.position_ids.to(device),
    ).last_hidden_state
    head = model.get_output_embeddings()
    chunk = chunk_tokens(int(model.config.vocab_size), chunk_mb)
    return head_logprobs(
        head, hidden, batch.pred_row, batch.pred_col, batch.target, batch.temperature, chunk
    )


def leaf_logprobs(
    model: torch.nn.Module,
    trees: list[TreeRollout],
    row_tokens: int = 0,
    chunk_mb: int = HEAD_CHUNK_MB,
) -> list[list[torch.Tensor]]:
    """For each tree and each of its leaves (in the tree's leaf order), the log-probs of the
    leaf's response tokens under ``model`` at the tree's temperature, by the packed path."""
    check_model(model)
    batch = pack(trees, row_tokens=row_tokens)
    token_lp = packed_token_logprobs(model, batch, chunk_mb)
    flat = [token_lp[idx.to(token_lp.device)] for idx in batch.leaf_index]
    out, k = [], 0
    for tree in trees:
        out.append(flat[k : k + len(tree.leaves)])
        k += len(tree.leaves)
    return out


def packed_batch_logprobs(
    model: torch.nn.Module,
    trees: list[TreeRollout],
    row_leaf: list[tuple[int, int]],
    mask: torch.Tensor,
    row_tokens: int = 0,
    chunk_mb: int = HEAD_CHUNK_MB,
) -> tuple[torch.Tensor, PackedBatch]:
    """The per-leaf layout of ``learner.batch.TrainBatch`` computed by the packed path: row r is
    leaf ``row_leaf[r] = (tree, leaf)``, its response log-probs go where ``mask[r]`` is 1 (the
    targets of its response tokens), zeros elsewhere. Returns ([rows, L-1] log-probs, the packed
    batch computed: its ``tokens`` and ``padding_fraction``)."""
    check_model(model)
    rows_of = rows_by_tree(row_leaf)
    order = list(rows_of)
    batch = pack(
        [trees[t] for t in order], [[row_leaf[r][1] for r in rows_of[t]] for t in order], row_tokens
    )
    token_lp = packed_token_logprobs(model, batch, chunk_mb)
    rows = [r for t in order for r in rows_of[t]]
    device = token_lp.device
    values = torch.cat([token_lp[idx.to(device)] for idx in batch.leaf_index])
    where = [torch.nonzero(mask[r], as_tuple=True)[0] for r in rows]
    if [len(w) for w in where] != [len(i) for i in batch.leaf_index]:
        raise ValueError("packed leaves do not match the batch's response masks")
    row_idx = torch.cat([torch.full_like(w, r) for r, w in zip(rows, where)]).to(device)
    col_idx = torch.cat(where).to(device)
    out = torch.zeros(mask.shape, dtype=token_lp.dtype, device=device)
    return out.index_put((row_idx, col_idx), values), batch
