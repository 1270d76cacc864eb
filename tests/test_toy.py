"""The toy model kit's warm-up data: what the model is taught before reinforcement learning."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.treepo.tasks import ArithTask, arith_reward
from toy.kit import (
    EOS_ID,
    KIT_VERSION,
    ToySpec,
    _batches,
    build_tokenizer,
    build_toy_model,
    shows_work,
)

TINY: dict[str, Any] = {
    "hidden": 32,
    "layers": 1,
    "heads": 2,
    "kv_heads": 1,
    "intermediate": 64,
    "batch": 8,
}
"""A model small enough to build in a second."""


def test_shows_work() -> None:
    assert shows_work("12+34=46;46+7=53;\\boxed{53}")
    assert shows_work("12+34=46;")  # steps without an answer still show work
    assert not shows_work("\\boxed{53}")
    assert not shows_work("\\boxed{53}=53")  # text after the answer does not count
    assert not shows_work("")


@pytest.mark.parametrize("direct_fraction", [0.0, 0.5, 1.0])
def test_warm_up_batches_mix_direct_and_worked_answers(direct_fraction: float) -> None:
    task, tokenizer = ArithTask(), build_tokenizer()
    spec = ToySpec(batch=32)
    batches = _batches(task, tokenizer, spec, seed=3, direct_fraction=direct_fraction)
    direct = total = 0
    for _ in range(8):
        ids, labels, mask = next(batches)
        assert ids.shape == labels.shape == mask.shape and ids.shape[0] == spec.batch
        for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
            answer_at = [i for i, x in enumerate(row_labels) if x != -100]
            # labels cover exactly the response and its end token, right after the prompt
            assert answer_at == list(range(answer_at[0], answer_at[-1] + 1))
            assert row_labels[answer_at[-1]] == EOS_ID
            prompt = tokenizer.decode(row_ids[: answer_at[0]], skip_special_tokens=True)
            response = tokenizer.decode(row_labels[answer_at[0] : answer_at[-1]])
            operands = tuple(int(x) for x in re.findall(r"\d+", prompt))
            assert prompt == task.problem(operands).prompt
            # every taught answer is right, by the task's own checker and by plain addition
            assert arith_reward(response, str(sum(operands))) > 0
            if shows_work(response):
                assert response == task.solution(operands)
            else:
                assert response == f"\\boxed{{{sum(operands)}}}"
                direct += 1
            total += 1
    assert abs(direct / total - direct_fraction) < 0.1


@pytest.mark.slow
def test_build_runs_both_phases_and_reuses_a_finished_model(tmp_path: Path) -> None:
    # an unreachable phase-1 target: phase 1 runs its budget (3 steps) and the build goes on
    budget: dict[str, Any] = {"worked_steps": 3, "eval_every": 1, "eval_problems": 4}
    spec = ToySpec(**TINY, **budget, worked_target=1.0, mix_steps=2)
    out = build_toy_model(tmp_path / "toy", seed=0, spec=spec)
    meta = json.loads((out / "toy_meta.json").read_text())
    assert (meta["worked_solution_steps"], meta["steps"]) == (3, 5)
    assert meta["mix_steps_kept"] in (1, 2)
    # reproducible: a second build from scratch gives the same bytes
    again = build_toy_model(tmp_path / "again", seed=0, spec=spec)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (
        json.loads((again / "toy_meta.json").read_text())["weights_sha256"]
        == meta["weights_sha256"]
    )
    assert meta["kit_version"] == KIT_VERSION and meta["spec"]["direct_fraction"] == 0.5
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_toy_model(tmp_path / "toy", seed=0, spec=spec) == out
    assert weights.stat().st_mtime_ns == stamp  # reused, not rebuilt
    build_toy_model(tmp_path / "toy", seed=0, spec=dataclasses.replace(spec, mix_steps=0))
    assert json.loads((out / "toy_meta.json").read_text())["steps"] == 3  # a new spec rebuilds
    # a reachable target (0) ends phase 1 at its first evaluation
    reached = dataclasses.replace(spec, worked_target=0.0, eval_every=2, mix_steps=0)
    meta = json.loads((build_toy_model(tmp_path / "t0", 0, reached) / "toy_meta.json").read_text())
    assert meta["worked_solution_steps"] == meta["steps"] == 2


def test_phase_two_keeps_the_evaluated_state_nearest_the_start_accuracy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Phase 2 keeps the weights of the evaluation whose accuracy is nearest ``start_accuracy``,
    not the last ones: evaluations are scripted, and the saved weights must equal the model's
    weights at the chosen evaluation."""
    import torch

    import toy.kit as kit

    scripted = iter([0.5, 0.6, 0.35, 0.22, 0.05])  # phase 1 ends at 0.5; phase 2: 0.6 .. 0.05
    snapshots: list[dict[str, torch.Tensor]] = []

    def fake_eval(model, tokenizer, problems):  # type: ignore[no-untyped-def]
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": next(scripted), "worked_fraction": 0.5}

    monkeypatch.setattr(kit, "greedy_eval", fake_eval)
    spec = ToySpec(**TINY, worked_steps=10, worked_target=0.4, eval_every=2, mix_steps=8)
    out = build_toy_model(tmp_path / "toy", seed=0, spec=spec)
    meta = json.loads((out / "toy_meta.json").read_text())
    assert (meta["worked_solution_steps"], meta["worked_solution_accuracy"]) == (2, 0.5)
    assert (meta["mix_steps_kept"], meta["heldout_greedy_accuracy"]) == (6, 0.22)
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    chosen = snapshots[3]  # phase 1's evaluation, then phase 2's at steps 2, 4, 6
    assert all(torch.equal(saved[k], chosen[k]) for k in saved if k in chosen)
    assert not all(torch.equal(saved[k], snapshots[-1][k]) for k in saved if k in chosen)
