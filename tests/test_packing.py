"""The tree-packed forward against the per-leaf padded one (the reference): log-probs and
gradients on random trees of random shapes, prompts, lengths and temperatures, on a small
random Qwen2 model with SDPA attention."""

from __future__ import annotations

import random

import pytest
import torch

from learner.batch import build_batch
from learner.packing import _fill_rows, check_model, leaf_logprobs, pack, pack_tree
from learner.trainer import token_logprobs
from pipeline.wire.messages import RolloutLeaf, TreeRollout

VOCAB = 64


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).float().eval()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def kernel_model(request: pytest.FixtureRequest, model: torch.nn.Module) -> torch.nn.Module:
    """The model under each dense-mask kernel the learner accepts (the same weights)."""
    import copy

    out = copy.deepcopy(model)
    out.config._attn_implementation = request.param
    return out


def random_tree(rng: random.Random, empty_nodes: bool = True) -> TreeRollout:
    """A random tree: 1-5 prompt tokens, up to 12 nodes of 0-6 tokens (0 only when allowed),
    random parents, every childless node a leaf."""
    tree = TreeRollout([rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 5))])
    tree.temperature = rng.choice([1.0, 0.7, 1.3])
    for i in range(rng.randint(1, 12)):
        parent = rng.randint(-1, i - 1)
        k = rng.randint(0 if empty_nodes else 1, 6)
        tree.add_node(
            parent, [rng.randrange(VOCAB) for _ in range(k)], [-rng.random() for _ in range(k)]
        )
    parents = {n.parent for n in tree.nodes}
    for i in range(len(tree.nodes)):
        if i not in parents:
            tree.leaves.append(RolloutLeaf(i, float(rng.choice([-1, 1])), "eos"))
    return tree


def reference(model: torch.nn.Module, trees: list[TreeRollout]) -> list[list[torch.Tensor]]:
    """Per-leaf padded rows (learner.batch + trainer.token_logprobs), cut to each response."""
    batch = build_batch(trees)
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.temperatures)
    out, row = [], 0
    for tree in trees:
        leaves = []
        for _ in tree.leaves:
            leaves.append(lp[row][batch.mask[row] == 1])
            row += 1
        out.append(leaves)
    return out


def test_layout_of_a_small_tree() -> None:
    """prompt [7, 8]; n0 = [1, 2]; n1 = [3] and n2 = [4, 5] under n0."""
    tree = TreeRollout([7, 8])
    tree.add_node(-1, [1, 2], [-0.1, -0.1])
    tree.add_node(0, [3], [-0.1])
    tree.add_node(0, [4, 5], [-0.1, -0.1])
    tree.add_leaf(1, "eos")
    tree.add_leaf(2, "eos")
    p = pack_tree(tree)
    assert p.tokens.tolist() == [7, 8, 1, 2, 3, 4, 5]
    assert p.positions.tolist() == [0, 1, 2, 3, 4, 4, 5]  # n2 starts where n1 did
    assert p.predictor.tolist() == [-1, -1, 1, 2, 3, 3, 5]  # both children read n0's last
    # (first token, tokens, earlier keys seen): n2 sees the prompt and n0, not n1
    groups = [(q, k, keys.tolist()) for q, k, keys in p.groups]
    assert groups == [(0, 2, []), (2, 2, [0, 1]), (4, 1, [0, 1, 2, 3]), (5, 2, [0, 1, 2, 3])]
    allowed = p.allowed()
    assert allowed[5].tolist() == [True, True, True, True, False, True, False]  # not n1
    assert allowed[4].tolist() == [True] * 5 + [False, False]
    assert [x.tolist() for x in p.leaf_tokens] == [[2, 3, 4], [2, 3, 5, 6]]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("row_tokens", [0, 64])
def test_packed_logprobs_equal_the_per_leaf_rows(
    kernel_model: torch.nn.Module, seed: int, row_tokens: int
) -> None:
    model = kernel_model
    rng = random.Random(seed)
    trees = [random_tree(rng) for _ in range(rng.randint(1, 4))]
    trees.append(random_tree(rng))  # always at least two trees
    single = TreeRollout([5])
    single.add_node(-1, [1, 2, 3], [-0.1] * 3)
    single.leaves.append(RolloutLeaf(0, 1.0, "eos"))
    trees.append(single)  # a single-leaf tree
    with torch.no_grad():
        want = reference(model, trees)
        got = leaf_logprobs(model, trees, row_tokens=row_tokens)
    assert [len(g) for g in got] == [len(t.leaves) for t in trees]
    for tw, tg in zip(want, got):
        for w, g in zip(tw, tg):
            assert g.shape == w.shape
            assert torch.allclose(g, w, atol=1e-4, rtol=0), (g - w).abs().max()


@pytest.mark.parametrize("seed", range(4))
def test_the_group_layout_is_the_per_tree_mask(seed: int) -> None:
    """The row mask built from the O(T) group layout (what SDPA gets, and what the FlexAttention
    block mask evaluates) is each tree's own mask on the diagonal, nothing across trees, and
    padding that sees only itself."""
    from torch.nn.attention.flex_attention import create_mask

    rng = random.Random(seed)
    trees = [random_tree(rng) for _ in range(4)]
    batch = pack(trees, row_tokens=40)
    dense = batch.attention[:, 0]
    rows, width = batch.group.shape
    want = torch.zeros_like(dense)
    lengths = [len(pack_tree(t).tokens) for t in trees]
    # the rows as pack() fills them (each row's trees in order, side by side)
    for row, members in enumerate(_fill_rows(lengths, 40)[0]):
        offset = 0
        for i in members:
            n = lengths[i]
            want[row, offset : offset + n, offset : offset + n] = torch.from_numpy(
                pack_tree(trees[i]).allowed()
            )
            offset += n
    for r in range(rows):
        real = int((want[r].sum(-1) > 0).sum())
        pad = torch.ones(width - real, width - real, dtype=torch.bool).tril()
        want[r, real:, real:] = pad
    assert torch.equal(dense, want)
    flex = create_mask(batch.mask_mod(torch.device("cpu")), rows, None, width, width, "cpu")
    assert torch.equal(flex[:, 0], dense)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_flex_attention_packing_equals_the_per_leaf_rows(
    model: torch.nn.Module, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FlexAttention path (block mask from the group layout; what a GPU learner uses) gives
    the per-leaf log-probs, here on CPU (forward only: torch has no FlexAttention backward on
    CPU; tests/test_devices.py checks the backward on CUDA). Uncompiled: inductor's CPU code for
    FlexAttention fails to build for some shapes here (torch 2.13), and the reference kernel
    computes the same attention."""
    import copy

    flex = copy.deepcopy(model)
    flex.config._attn_implementation = "flex_attention"
    check_model(flex)
    rng = random.Random(seed)
    trees = [random_tree(rng, empty_nodes=False) for _ in range(3)]
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    def eager(query, key, value, training=False, **kwargs):  # type: ignore[no-untyped-def]
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager)
    with torch.no_grad():
        want = reference(model, trees)
        got = leaf_logprobs(flex, trees, row_tokens=64)
    for tw, tg in zip(want, got):
        for w, g in zip(tw, tg):
            assert torch.allclose(g, w, atol=1e-4, rtol=0), (g - w).abs().max()


@pytest.mark.parametrize("seed", range(5))
def test_rows_are_filled_first_fit_with_little_padding(seed: int) -> None:
    """Every tree in exactly one row, no row over max(budget, longest), and the rows' padding
    no more than the largest leftover a first fit can leave (each row but the emptiest holds
    more than half the width, or could not take the next tree)."""
    rng = random.Random(seed)
    lengths = [rng.randint(5, 400) for _ in range(rng.randint(2, 40))]
    for budget in (0, 300, 1000):
        rows, used = _fill_rows(lengths, budget)
        cap = max(budget, *lengths)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(u <= cap for u in used)
        assert used == [sum(lengths[i] for i in r) for r in rows]
        # first fit: no two rows both at most half full
        assert sum(u <= cap / 2 for u in used) <= 1
        one_a_row = len(lengths) * max(lengths)
        assert len(rows) * cap <= one_a_row or budget > max(lengths)


def test_packing_computes_each_shared_token_once() -> None:
    rng = random.Random(3)
    trees = [random_tree(rng, empty_nodes=False) for _ in range(5)]
    batch = pack(trees, row_tokens=10_000)
    unique = sum(len(t.prompt_token_ids) + sum(len(n.token_ids) for n in t.nodes) for t in trees)
    assert batch.tokens == unique and batch.input_ids.shape[0] == 1
    assert len(batch.target) == sum(len(n.token_ids) for t in trees for n in t.nodes)
    per_leaf = sum(t.response_length(x.node) for t in trees for x in t.leaves)
    assert sum(len(i) for i in batch.leaf_index) == per_leaf


@pytest.mark.parametrize("seed", range(3))
def test_gradients_equal_the_per_leaf_path(kernel_model: torch.nn.Module, seed: int) -> None:
    """A per-leaf loss (random weight per leaf token): shared tokens count once per leaf."""
    model = kernel_model
    rng = random.Random(100 + seed)
    trees = [random_tree(rng) for _ in range(3)]
    gen = torch.Generator().manual_seed(seed)

    def grads(logprobs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        model.zero_grad()
        g = torch.Generator().manual_seed(seed)
        loss = sum(
            (lp * torch.randn(lp.shape, generator=g)).sum() for leaves in logprobs for lp in leaves
        )
        loss.backward()  # type: ignore[union-attr]
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    del gen
    want = grads(reference(model, trees))
    got = grads(leaf_logprobs(model, trees))
    for w, g in zip(want, got):
        scale = w.abs().max().clamp_min(1e-6)
        assert ((w - g).abs().max() / scale) < 1e-4


def test_models_the_packed_forward_would_get_wrong_are_refused(model: torch.nn.Module) -> None:
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match=r"4-D mask.*PACKING=leaf"):
            check_model(model)
    finally:
        model.config._attn_implementation = "sdpa"
    saved = model.config.layer_types
    model.config.layer_types = ["sliding_attention", "full_attention"]
    try:
        with pytest.raises(ValueError, match=r"sliding-window.*PACKING=leaf"):
            check_model(model)
    finally:
        model.config.layer_types = saved


@pytest.mark.slow
def test_micro_batches_by_tokens_bound_the_work_and_keep_the_update(toy_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One step with a small token budget (several accumulated micro-batches, each within the
    budget, the proximal pass's forwards too) moves the weights as one step over the whole batch
    does."""
    from learner.trainer import build_engine, full_state_dict, micro_batches, train_on_batch
    from pipeline.config import LearnerOptions, LossSettings

    rng = random.Random(7)
    trees = []
    for _ in range(4):
        t = random_tree(rng)
        for node in t.nodes:
            node.token_ids = node.token_ids % 32
        t.prompt_token_ids = t.prompt_token_ids % 32
        trees.append(t)
    batch = build_batch(trees)
    results = []
    import learner.trainer as trainer

    forwards: list[tuple[bool, int, int]] = []  # (gradient, real tokens, leaves) of each forward
    packed_forward = trainer.packed_batch_logprobs

    def recording(module, trees, row_leaf, mask, *args):  # type: ignore[no-untyped-def]
        lp, packed = packed_forward(module, trees, row_leaf, mask, *args)
        forwards.append((torch.is_grad_enabled(), packed.tokens, len(row_leaf)))
        return lp, packed

    monkeypatch.setattr(trainer, "packed_batch_logprobs", recording)
    monkeypatch.setattr(trainer, "one_update", lambda opts, module: False)  # a proximal pass
    for budget in (0, 24):
        opts = LearnerOptions(model=str(toy_model), lr=1e-3, micro_batch_tokens=budget)
        torch.manual_seed(0)
        engine = build_engine(toy_model, opts)
        forwards.clear()
        if budget:
            parts = micro_batches(batch, torch.arange(batch.rows), opts)
            assert len(parts) > 2
            for part in parts:
                held = batch.select(part).row_leaf
                present = sorted({t for t, _ in held})
                leaves = [[k for t, k in held if t == i] for i in present]
                tokens = pack([trees[i] for i in present], leaves).tokens
                assert len(part) == 1 or tokens <= budget, (tokens, budget)
        start = full_state_dict(engine)
        stats = train_on_batch(engine, batch, opts, LossSettings(), step=0)
        results.append((stats, full_state_dict(engine)))
        proximal = [(tokens, leaves) for grad, tokens, leaves in forwards if not grad]
        if budget:  # the proximal pass is token-budgeted like training: no forward over budget
            assert len(proximal) == len(parts), proximal
            assert all(t <= budget or leaves == 1 for t, leaves in proximal), proximal
        else:
            assert len(proximal) == 1
    (s0, w0), (s1, w1) = results
    assert s1.tokens_computed > 0 and abs(s0.loss - s1.loss) < 1e-5
    # one micro-batch: the proximal and training forwards both pack the whole batch
    assert s0.padding_fraction == pytest.approx(pack(trees).padding_fraction)
    assert 0.0 <= s1.padding_fraction < 1.0
    # the gradient before clipping (scale included: Adam's update alone would hide a scale)
    assert abs(s0.grad_norm - s1.grad_norm) <= 1e-4 * s0.grad_norm, (s0.grad_norm, s1.grad_norm)
    # the update's direction: Adam normalises each element, so float noise in near-zero
    # gradients (different padding, different sums) moves single elements; the step as a whole
    # must be the same one
    d0 = torch.cat([(w0[k] - start[k]).flatten() for k in w0])
    d1 = torch.cat([(w1[k] - start[k]).flatten() for k in w0])
    assert float(torch.nn.functional.cosine_similarity(d0, d1, dim=0)) > 0.99
    assert abs(float(d0.norm() / d1.norm()) - 1) < 0.01


def _layout_truth(batch, r: int, qb: int, kb: int, block: int) -> tuple[bool, bool]:  # type: ignore[no-untyped-def]
    """(some, all) pairs of query block qb x key block kb of row r allowed, by brute force on
    the mask_mod over just those positions."""
    width = batch.group.shape[1]
    q = torch.arange(qb * block, min(width, (qb + 1) * block)).view(-1, 1)
    k = torch.arange(kb * block, min(width, (kb + 1) * block)).view(1, -1)
    g = batch.group[r]
    allowed = (k <= q) & batch.sees[r][g[q], g[k]]
    return bool(allowed.any()), bool(allowed.all())


@pytest.mark.parametrize("seed", range(4))
def test_block_layout_is_create_block_masks(seed: int) -> None:
    """The block mask built from the group layout has the blocks torch's own
    ``create_block_mask`` finds by evaluating the mask everywhere: the same partial and full
    key blocks of every query block."""
    from torch.nn.attention.flex_attention import create_block_mask

    rng = random.Random(seed)
    trees = [random_tree(rng) for _ in range(6)]
    batch = pack(trees, row_tokens=70)
    rows, width = batch.group.shape
    block = 8
    mine = batch.block_mask(torch.device("cpu"), block=block)
    theirs = create_block_mask(
        batch.mask_mod(torch.device("cpu")), rows, None, width, width, "cpu", BLOCK_SIZE=block
    )

    def blocks(num: torch.Tensor, idx: torch.Tensor) -> list[list[set[int]]]:
        return [
            [set(idx[r, 0, i, : num[r, 0, i]].tolist()) for i in range(num.shape[2])]
            for r in range(rows)
        ]

    assert blocks(mine.kv_num_blocks, mine.kv_indices) == blocks(
        theirs.kv_num_blocks, theirs.kv_indices
    )
    assert blocks(mine.full_kv_num_blocks, mine.full_kv_indices) == blocks(
        theirs.full_kv_num_blocks, theirs.full_kv_indices
    )


def test_block_mask_of_a_100k_token_tree_needs_no_dense_mask() -> None:
    """A 100k-token tree (a dense boolean mask would be 10 GB, create_block_mask's ~11 bytes a
    pair 110 GB): the block mask is built in a fresh process within 300 MB more peak memory,
    and sampled block pairs agree with the mask evaluated on just their positions."""
    import subprocess
    import sys

    code = """
import random, torch, sys
sys.path.insert(0, '.')
from tests.test_packing import binary_tree, _layout_truth
from learner.packing import pack
batch = pack([binary_tree(depth=7, node_tokens=790)])
width = batch.group.shape[1]
from bench.common import reset_peak_rss, status_kib
before = reset_peak_rss()
mask = batch.block_mask(torch.device('cpu'))
grown = (status_kib('VmHWM') - before) / 1024
partial, full = batch.block_layout()
nb = partial.shape[1]
rng = random.Random(0)
pairs = [(rng.randrange(nb), rng.randrange(nb)) for _ in range(300)]
pairs += [(i, j) for i in range(nb) for j in range(nb) if full[0, i, j]][:50]
for qb, kb in pairs:
    some, every = _layout_truth(batch, 0, qb, kb, 128)
    cut = width % 128 and nb - 1 in (qb, kb)
    assert bool(full[0, qb, kb]) == (every and kb < qb and not cut), (qb, kb)
    assert bool(partial[0, qb, kb] | full[0, qb, kb]) == some, (qb, kb)
assert int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()) < nb * nb / 2
print(width, grown)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    width, grown = out.stdout.split()
    assert int(width) > 100_000 and float(grown) < 300, out.stdout


def binary_tree(depth: int, node_tokens: int, prompt: int = 100) -> TreeRollout:
    """A full binary tree of ``depth`` levels of ``node_tokens``-token nodes (the learner memory
    benchmark's builder, tokens below this file's vocabulary)."""
    from bench.learner_memory import binary_tree as build

    return build(depth, node_tokens, prompt, VOCAB, seed=depth)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_one_update_steps_take_pi_prox_from_their_own_forward(toy_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With one update a step (one epoch, one mini-batch, no dropout) the proximal pass is
    skipped, and the update is the one a separate proximal pass gives."""
    import learner.trainer as trainer
    from learner.trainer import build_engine, full_state_dict, train_on_batch
    from pipeline.config import LearnerOptions, LossSettings

    rng = random.Random(11)
    trees = []
    for _ in range(3):
        t = random_tree(rng, empty_nodes=False)
        t.prompt_token_ids = t.prompt_token_ids % 32
        for node in t.nodes:
            node.token_ids = node.token_ids % 32
            node.logprobs = node.logprobs - 0.5  # behavior differs from the policy: w != 1
        trees.append(t)
    batch = build_batch(trees)
    opts = LearnerOptions(model=str(toy_model), lr=1e-3)
    after = []
    for skip in (True, False):
        monkeypatch.setattr(trainer, "one_update", lambda o, m, skip=skip: skip)
        torch.manual_seed(0)
        engine = build_engine(toy_model, opts)
        assert trainer.one_update is not None
        stats = train_on_batch(engine, batch, opts, LossSettings(), step=0)
        after.append((stats, full_state_dict(engine)))
    (s_skip, w_skip), (s_pass, w_pass) = after
    assert s_skip.tokens_computed < s_pass.tokens_computed  # one forward fewer
    assert (
        abs(s_skip.loss - s_pass.loss) < 1e-6
        and abs(s_skip.is_weight_mean - s_pass.is_weight_mean) < 1e-6
    )
    for k in w_skip:
        assert torch.allclose(w_skip[k], w_pass[k], atol=1e-6), k
    monkeypatch.undo()
    assert trainer.one_update(opts, engine.module)  # the toy model qualifies by itself
    assert not trainer.one_update(opts.model_copy(update={"mini_batches": 2}), engine.module)


def test_flex_attention_packs_a_micro_batch_into_one_row(model: torch.nn.Module) -> None:
    """Under FlexAttention (block-sparse) rows take the micro-batch budget, so trees share one
    row without padding; under SDPA rows stay as wide as the longest tree."""
    import copy

    from learner.trainer import row_budget
    from pipeline.config import LearnerOptions

    flex = copy.deepcopy(model)
    flex.config._attn_implementation = "flex_attention"
    opts = LearnerOptions(micro_batch_tokens=4096)
    assert row_budget(opts, flex) == 4096 and row_budget(opts, model) == 0
    assert row_budget(opts.model_copy(update={"pack_row_tokens": 100}), flex) == 100
    rng = random.Random(5)
    trees = [random_tree(rng, empty_nodes=False) for _ in range(6)]
    one = pack(trees, row_tokens=row_budget(opts, flex))
    assert one.input_ids.shape[0] == 1 and one.padding_fraction == 0.0
    lengths = [len(pack_tree(t).tokens) for t in trees]
    wide = pack(trees, row_tokens=row_budget(opts, model))
    assert wide.padding_fraction <= 1 - (sum(lengths) / len(lengths)) / max(lengths) + 1e-9
