"""The first trees of one sampler, for the seed test: ``python -m tests.seed_probe MODEL OUT``.

Builds the engine and the tree generator exactly as a sampler process does from its settings
(``TREEPO_RUN__SEED``, ``TREEPO_SAMPLER__PORT``, ... from the environment), grows two trees of a
fixed prompt one after the other, and writes their response tokens to OUT as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys

from pipeline.config import SamplerSettings, load_settings
from pipeline.treepo.sampling import TreeSampler
from workers.engine import EngineOptions, VLLMPathGenerator
from workers.trees import tree_rng


def main(model: str, out: str) -> None:
    settings = load_settings(SamplerSettings, warn=False)
    engine = VLLMPathGenerator(EngineOptions.from_settings(settings, model))
    tree_cfg = settings.tree.model_copy(update={"eos_token_id": engine.eos_token_id})
    tokenizer = engine.tokenizer
    sampler = TreeSampler(
        engine,
        tree_cfg,
        rng=tree_rng(settings),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )
    prompt = engine.tokenizer("12+34+5=")["input_ids"]
    trees = [asyncio.run(engine.call(sampler.grow(prompt))) for _ in range(2)]
    leaves = [[t.response_tokens(leaf.node).tolist() for leaf in t.leaves] for t in trees]
    engine.close()
    with open(out, "w") as f:
        json.dump(leaves, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
