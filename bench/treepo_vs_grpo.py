"""TreePO vs GRPO-style training at an equal token budget on the toy task.

TreePO: segment trees (root fan-out 4, branching 2) with the ``average`` tree advantage.
GRPO-style: independent sampling (root fan-out = width, branching 1: every path alone, no shared
prefix) with the ``root`` advantage (leaf reward minus the group mean). Same width, segment,
depth, learning rate and batch; each run stops once the trees it received hold the same number
of decoded tokens (``TREEPO_LEARNER__TOKEN_BUDGET``). Reported: greedy held-out accuracy after
the budget, tokens spent, steps and trees.

    python -m bench.treepo_vs_grpo [--quick]
"""

from __future__ import annotations

from bench.common import add_model_option, parser, toy_model, write_result
from bench.training import QUICK_SETTINGS, train

WIDTH = 8


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    add_model_option(p)
    p.add_argument("--tokens", type=int, default=None, help="token budget (150000; 3000 quick)")
    p.add_argument("--heldout", type=int, default=None, help="held-out problems (400; 20 quick)")
    args = p.parse_args(argv)
    tokens = args.tokens or (3000 if args.quick else 150_000)
    heldout = args.heldout or (20 if args.quick else 400)
    model = toy_model(args)
    common = {
        "TREEPO_LEARNER__TOKEN_BUDGET": str(tokens),
        "TREEPO_TREE__WIDTH": str(WIDTH),
        **(QUICK_SETTINGS if args.quick else {}),
    }
    methods = {
        "treepo": {
            "TREEPO_TREE__INITIAL_DIVERGENCE": "4",
            "TREEPO_TREE__BRANCHING": "2",
            "TREEPO_LOSS__ADVANTAGE": "average",
        },
        "grpo": {
            "TREEPO_TREE__INITIAL_DIVERGENCE": str(WIDTH),
            "TREEPO_TREE__BRANCHING": "1",
            "TREEPO_LOSS__ADVANTAGE": "root",
        },
    }
    rows = {}
    for name, settings in methods.items():
        rows[name] = {"settings": settings, **train(name, model, {**common, **settings}, heldout)}
        print(name, rows[name], flush=True)
    result = {
        "token_budget": tokens,
        "width": WIDTH,
        "methods": rows,
        "accuracy_difference": rows["treepo"]["heldout_accuracy"]
        - rows["grpo"]["heldout_accuracy"],
        "trained_trees_ratio": rows["treepo"]["trained_trees"]
        / max(1, rows["grpo"]["trained_trees"]),
    }
    write_result("treepo_vs_grpo", args, result)
    for k, v in rows.items():
        print(
            f"{k}: held-out {v['heldout_accuracy']:.3f} ± {v['heldout_ci95']:.3f} after "
            f"{v['tokens_received']} tokens, {v['steps']} steps, {v['trained_trees']} trees trained"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
