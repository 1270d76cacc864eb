"""Run under the DeepSpeed launcher by tests/test_ranks.py (one rank or several), for each of
the comma-separated ZeRO STAGES in turn:

    ds_ranks.py update MODEL OUT STAGES  one update of a fixed batch of random trees; rank 0
                                         writes the full weights before and after, and the
                                         step's statistics; every rank its weight checksum
    ds_ranks.py save MODEL OUT STAGES    two updates with a checkpoint between; every rank
                                         writes its optimizer state at the checkpoint, and
                                         rank 0 the weights after the second update
    ds_ranks.py resume MODEL OUT STAGES  restore that checkpoint, write the optimizer state as
                                         restored, take the second update again, write weights
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fixed_trees(vocab: int) -> list:  # type: ignore[type-arg]
    from tests.test_packing import random_tree

    rng = random.Random(11)
    trees = []
    for _ in range(5):
        t = random_tree(rng, empty_nodes=False)
        for node in t.nodes:
            node.token_ids = node.token_ids % vocab
        t.prompt_token_ids = t.prompt_token_ids % vocab
        trees.append(t)
    return trees


def optimizer_state(engine) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """This rank's optimizer state tensors and master partitions (what a checkpoint holds)."""
    from learner.checkpoint import _flatten_optimizer, _masters, optimizer_view

    with optimizer_view(engine) as optimizer:
        tensors, _ = _flatten_optimizer(optimizer)
        for i, m in enumerate(_masters(engine)):
            tensors[f"master.{i}"] = m.detach().cpu().clone()
    return tensors


def evaluator(model_dir: str):  # type: ignore[no-untyped-def]
    """The learner's held-out evaluation of 8 built-in problems (answers of 24 tokens)."""
    from transformers import AutoTokenizer

    from learner.evaluate import Evaluator
    from pipeline.config import LearnerOptions, LearnerSettings
    from pipeline.treepo.tasks import ArithTask

    settings = LearnerSettings(learner=LearnerOptions(model=model_dir, eval_max_tokens=24))
    problems = ArithTask().problems("heldout", 8, seed=1)
    return Evaluator(settings, AutoTokenizer.from_pretrained(model_dir), problems)


def main() -> None:
    from learner.ranks import leave

    mode, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    for stage in [int(s) for s in sys.argv[4].split(",")]:
        run(mode, model_dir, out, stage)
    leave(0)


def run(mode: str, model_dir: str, out: Path, stage: int) -> None:
    from learner.batch import build_batch
    from learner.checkpoint import load_checkpoint, save_checkpoint
    from learner.ranks import control
    from learner.trainer import build_engine, export_weights, full_state_dict, train_on_batch
    from pipeline.checkpoints import latest_checkpoint
    from pipeline.config import LearnerOptions, LossSettings

    torch.manual_seed(0)
    opts = LearnerOptions(
        model=model_dir,
        lr=1e-4,
        zero_stage=stage,
        mini_batches=2,
        zero3_persistence_threshold=0,  # partition every parameter of the tiny model
        rank_timeout_s=120,
    )
    engine = build_engine(model_dir, opts)
    ctl = control()
    batch = build_batch(fixed_trees(int(engine.module.config.vocab_size)))
    tag = f"w{ctl.world}-s{stage}"
    root = out / f"ckpt-{tag}"
    if mode == "update":
        before = full_state_dict(engine)
        stats = train_on_batch(engine, batch, opts, LossSettings(), step=0)
        after = full_state_dict(engine)
        checksum = float(sum(v.double().sum().item() for v in after.values()))
        (out / f"checksum-{tag}-rank{ctl.rank}.json").write_text(json.dumps(checksum))
        export_weights(engine, out / f"export-{tag}" if ctl.rank == 0 else None)
        answers = evaluator(model_dir).answers(engine.module, ctl, zero3=stage == 3, batch=3)
        (out / f"answers-{tag}-rank{ctl.rank}.json").write_text(json.dumps(answers))
        if ctl.rank == 0:
            save_file(before, str(out / f"before-{tag}.safetensors"))
            save_file(after, str(out / f"after-{tag}.safetensors"))
            (out / f"stats-{tag}.json").write_text(json.dumps(stats.__dict__))
    elif mode == "save":
        train_on_batch(engine, batch, opts, LossSettings(), step=0)
        save_checkpoint(root, 1, engine, {"step": 1}, ctl)
        save_file(optimizer_state(engine), str(out / f"optim-saved-{tag}-rank{ctl.rank}.st"))
        train_on_batch(engine, batch, opts, LossSettings(), step=1)
        if ctl.rank == 0:
            save_file(full_state_dict(engine), str(out / f"second-saved-{tag}.st"))
        else:
            full_state_dict(engine)
    elif mode == "resume":
        path = latest_checkpoint(root)
        assert path is not None
        load_checkpoint(path, engine, ctl)
        save_file(optimizer_state(engine), str(out / f"optim-resumed-{tag}-rank{ctl.rank}.st"))
        train_on_batch(engine, batch, opts, LossSettings(), step=1)
        state = full_state_dict(engine)
        if ctl.rank == 0:
            save_file(state, str(out / f"second-resumed-{tag}.st"))


if __name__ == "__main__":
    main()
