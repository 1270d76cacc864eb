"""Every tensor the learner creates follows the model's device: checked without a GPU (an AST
read of every tensor factory call, and the loss on PyTorch's ``meta`` device, where mixing devices
raises), and with one when CUDA is present (marked ``gpu``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from learner.batch import build_batch
from learner.loss import behavior_log_weights
from pipeline.wire.messages import RolloutLeaf, RolloutNode, TreeRollout

ROOT = Path(__file__).resolve().parent.parent
FACTORIES = {
    "zeros", "ones", "full", "empty", "tensor", "arange", "randn", "rand", "randint",
    "randperm", "eye", "linspace", "zeros_like", "ones_like", "full_like", "empty_like",
    "Generator",
}  # fmt: skip
LIKE = {"zeros_like", "ones_like", "full_like", "empty_like"}  # these follow their input


def factory_calls_without_device(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f = node.func
        if not (isinstance(f.value, ast.Name) and f.value.id == "torch" and f.attr in FACTORIES):
            continue
        if f.attr in LIKE or any(k.arg == "device" for k in node.keywords):
            continue
        out.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.{f.attr}")
    return out


def test_no_tensor_factory_in_learner_without_an_explicit_device() -> None:
    missing = [
        c for p in sorted((ROOT / "learner").glob("*.py")) for c in factory_calls_without_device(p)
    ]
    assert missing == [], missing


def test_the_check_catches_a_missing_device(tmp_path: Path) -> None:
    bad = ROOT / "learner" / "_probe_for_test.py"
    bad.write_text("import torch\nx = torch.zeros(3)\ny = torch.zeros(3, device='cpu')\n")
    try:
        assert factory_calls_without_device(bad) == ["learner/_probe_for_test.py:2 torch.zeros"]
    finally:
        bad.unlink()


def tree() -> TreeRollout:
    return TreeRollout(
        [1, 2, 3],
        [RolloutNode(-1, [4, 5], [-0.5, -0.7], 0), RolloutNode(0, [6], [-0.2], 0),
         RolloutNode(0, [7, 8], [-0.1, -0.3], 0)],
        [RolloutLeaf(1, 1.0, "eos"), RolloutLeaf(2, -1.0, "eos")],
    )  # fmt: skip


def test_segment_weights_stay_on_the_inputs_device() -> None:
    """On ``meta`` a CPU buffer mixed in raises; the result must be on meta too."""
    batch = build_batch([tree()]).to("meta")
    assert {t.device.type for t in (batch.input_ids, batch.mask, batch.segment_ids)} == {"meta"}
    prox = torch.zeros_like(batch.behavior_logprobs)
    log_w = behavior_log_weights(
        prox, batch.behavior_logprobs, batch.mask, batch.segment_ids.clamp(max=1), "segment"
    )
    assert log_w.device.type == "meta" and log_w.shape == batch.mask.shape
    picked = batch.select(torch.tensor([1], device="cpu"))  # a CPU row index works too
    assert picked.input_ids.device.type == "meta" and picked.rows == 1


@pytest.mark.gpu
def test_learner_step_on_cuda(toy_model: Path, tmp_path: Path) -> None:
    """One learner update with the model on CUDA (skipped without a GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import os

    from learner.trainer import build_engine, train_on_batch
    from pipeline.config import LearnerOptions, LossSettings

    os.environ.setdefault("MASTER_PORT", "29533")
    opts = LearnerOptions(model=str(toy_model), lr=1e-4)
    engine = build_engine(toy_model, opts)
    assert next(engine.module.parameters()).device.type == "cuda"
    stats = train_on_batch(engine, build_batch([tree()]), opts, LossSettings(), step=0)
    assert stats.tokens == 3 and abs(stats.is_weight_mean) < 100


@pytest.mark.gpu
def test_flex_attention_on_cuda_equals_the_cpu_packed_path(toy_model: Path) -> None:
    """On CUDA the learner picks FlexAttention (block mask from the tree); its packed log-probs
    equal the CPU SDPA path's (skipped without a GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from transformers import AutoModelForCausalLM

    from learner.packing import leaf_logprobs
    from learner.trainer import attention_kernel
    from pipeline.config import LearnerOptions

    assert attention_kernel(LearnerOptions(model=str(toy_model))) == "flex_attention"
    cpu = AutoModelForCausalLM.from_pretrained(str(toy_model), attn_implementation="sdpa")
    gpu = AutoModelForCausalLM.from_pretrained(
        str(toy_model), attn_implementation="flex_attention"
    ).cuda()
    trees = [tree(), tree()]
    want = leaf_logprobs(cpu, trees)
    got = leaf_logprobs(gpu, trees)
    for tw, tg in zip(want, got):
        for w, g in zip(tw, tg):
            assert torch.allclose(g.detach().cpu(), w.detach(), atol=1e-4)
    sum(w.sum() for tw in want for w in tw).backward()
    sum(g.sum() for tg in got for g in tg).backward()
    for (name, a), b in zip(gpu.named_parameters(), cpu.parameters()):
        assert torch.allclose(a.grad.cpu(), b.grad, atol=1e-4, rtol=1e-3), name
