"""``treepo config check``: what can be verified before a start-up takes minutes.

Every check returns one line per problem, naming the setting: model directories that are not
there (a hub id, a typo) or lack a config, tokenizer or safetensors weights; a dataset that
is missing or has a bad row; a Redis that does not answer. Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pipeline.config import LearnerSettings, RedisSettings, SamplerSettings
from pipeline.errors import DatasetError
from pipeline.tasks import load_dataset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_dir_problems(setting: str, value: str) -> list[str]:
    """Problems of the model directory ``value`` given as ``setting``."""
    if not value:
        return [f"{setting}: not set (a local Hugging Face model directory)"]
    path = Path(value)
    if not path.is_dir():
        hint = " (a hub id? download the model to a directory first)" if "/" in value else ""
        return [f"{setting}: {value!r} is not a directory{hint}"]
    out = []
    if not (path / "config.json").is_file():
        out.append(f"{setting}: {value} has no config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        out.append(f"{setting}: {value} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if not any(path.glob("*.safetensors")):
        out.append(f"{setting}: {value} has no .safetensors weights")
    return out


def dataset_problems(settings: LearnerSettings) -> list[str]:
    opts = settings.learner
    if opts.dataset == "arith":
        return []
    try:
        load_dataset(opts.dataset, opts.prompt_field, opts.answer_field, opts.task)
    except (DatasetError, ValueError, OSError) as exc:
        return [f"TREEPO_LEARNER__DATASET: {exc}"]
    return []


async def redis_problems(settings: RedisSettings, timeout_s: float = 3.0) -> list[str]:
    from pipeline.streams import make_client

    client = make_client(settings)
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except Exception as exc:  # any failure to answer is the finding
        detail = str(exc) or type(exc).__name__
        return [f"TREEPO_REDIS__URL: {settings.url} does not answer ({detail})"]
    finally:
        await client.aclose()
    return []


def preflight(sampler: SamplerSettings, learner: LearnerSettings) -> list[str]:
    """Every problem found, one line each (empty: all checks passed)."""
    problems = model_dir_problems("TREEPO_SAMPLER__MODEL", sampler.sampler.model)
    problems += model_dir_problems("TREEPO_LEARNER__MODEL", learner.learner.model)
    problems += dataset_problems(learner)
    problems += asyncio.run(redis_problems(learner.redis))
    return problems
