"""``treepo toy ...``: the toy kit's subcommands, added to the ``treepo`` command through the
``treepo.commands`` entry point (pipeline/ never imports the toy kit)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    """Add ``toy build`` to the ``treepo`` subparsers ``sub``."""
    toy = sub.add_parser("toy", help="the toy model kit").add_subparsers(
        dest="toy_command", required=True, metavar="ACTION"
    )
    build = toy.add_parser("build", help="build (or reuse) the toy model; prints its directory")
    build.add_argument("--out", required=True, help="model directory to create")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from toy.kit import build_toy_model  # torch/transformers: imported only here

    print(build_toy_model(args.out, seed=args.seed))
    return 0
