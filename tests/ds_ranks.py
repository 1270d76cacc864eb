"""Run under the DeepSpeed launcher by tests/test_learner.py: train one fixed batch for a few steps
on every rank and write each rank's losses and a weight checksum to <out>/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    model_dir, out, stage = args[0], Path(args[1]), int(args[2])
    import torch

    from learner.batch import build_batch
    from learner.loss import policy_loss
    from learner.trainer import build_engine, full_state_dict, rank, token_logprobs, train_on_batch
    from pipeline.config import LearnerOptions, LossSettings
    from pipeline.messages import RolloutLeaf, RolloutNode, TreeRollout

    torch.manual_seed(0)
    opts = LearnerOptions(model=model_dir, lr=1e-4, zero_stage=stage, mini_batches=1)
    engine = build_engine(model_dir, opts)
    # one fixed tree: the correct leaf is rewarded, the wrong one punished
    good = [4, 5, 13, 6, 7, 14, 7, 8, 15, 7, 8, 13, 10, 14, 8, 4, 15, 16, 8, 4, 17, 1]
    bad = [4, 5, 13, 6, 7, 14, 5, 5, 15, 5, 5, 13, 10, 14, 6, 2, 15, 16, 6, 2, 17, 1]
    nodes = [
        RolloutNode(-1, good[:6], [-1.0] * 6, 0),
        RolloutNode(0, good[6:], [-1.0] * 16, 0),
        RolloutNode(0, bad[6:], [-1.0] * 16, 0),
    ]
    tree = TreeRollout(
        [4, 5, 13, 6, 7, 13, 10, 14],
        nodes,
        [RolloutLeaf(1, 1.0, "eos"), RolloutLeaf(2, -1.0, "eos")],
        tree_id="t",
    )
    batch = build_batch([tree] * 4)

    def surrogate(reference: torch.Tensor) -> float:
        """The TreePO loss of the current policy against the fixed initial policy."""
        with torch.no_grad():
            lp = token_logprobs(engine.module, batch.input_ids, batch.attention_mask)
            loss, _ = policy_loss(
                lp,
                reference,
                batch.behavior_logprobs,
                batch.advantages,
                batch.mask,
                batch.segment_ids,
            )
        return float(loss.item())

    with torch.no_grad():
        initial = token_logprobs(engine.module, batch.input_ids, batch.attention_mask)
    losses = [surrogate(initial)]
    for step in range(4):
        train_on_batch(engine, batch, opts, LossSettings(), step)
        losses.append(surrogate(initial))
    state = full_state_dict(engine)
    checksum = float(sum(v.double().sum().item() for v in state.values()))
    r = rank()
    (out / f"rank{r}.json").write_text(
        json.dumps(
            {"losses": losses, "checksum": checksum, "world": torch.distributed.get_world_size()}
        )
    )


if __name__ == "__main__":
    main()
