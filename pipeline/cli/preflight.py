"""``treepo config check``: what can be verified before a start-up takes minutes.

Every check returns one line per problem, naming the setting: model directories that are not
there (a hub id, a typo) or lack a config, tokenizer or safetensors weights; a tokenizer that
does not load, or has no chat template when one is asked for; a dataset that is missing or has
a bad row; a reward function that does not import; a Redis that does not answer; a configured
weight URL that does not answer. Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from pipeline.config import LearnerSettings, RedisSettings, SamplerSettings
from pipeline.errors import DatasetError
from pipeline.treepo.tasks import load_dataset

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


def tokenizer_problems(setting: str, value: str, chat_template: bool = False) -> list[str]:
    """The tokenizer of model directory ``value`` loads (``tokenizer.json``, with the
    ``tokenizers`` library) and has a chat template when ``chat_template`` asks for one."""
    path = Path(value)
    if not path.is_dir():
        return []  # reported by model_dir_problems
    out = []
    file = path / "tokenizer.json"
    if file.is_file():
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(file))
        except ImportError:
            pass
        except Exception as exc:  # any failure to load is the finding
            out.append(f"{setting}: {file} does not load ({str(exc)[:120]})")
    if chat_template:
        config = path / "tokenizer_config.json"
        try:
            has = (
                "chat_template" in json.loads(config.read_text())
                or (path / "chat_template.jinja").is_file()
            )
        except (OSError, ValueError):
            has = (path / "chat_template.jinja").is_file()
        if not has:
            out.append(
                f"TREEPO_LEARNER__CHAT_TEMPLATE: the tokenizer in {value} has no chat template"
            )
    return out


def reward_problems(sampler: SamplerSettings, learner: LearnerSettings) -> list[str]:
    from pipeline.treepo.tasks import reward_fn

    out = []
    for setting, name in (
        ("TREEPO_SAMPLER__DEFAULT_TASK", sampler.sampler.default_task),
        ("TREEPO_LEARNER__TASK", learner.learner.task),
    ):
        try:
            reward_fn(name)
        except ValueError as exc:
            out.append(f"{setting}: {exc}")
    return out


async def weight_url_problems(settings: LearnerSettings, timeout_s: float = 3.0) -> list[str]:
    """A configured ``TREEPO_WEIGHTS__PUBLIC_URL`` answers (its ``/healthz``)."""
    url = settings.weights.public_url.rstrip("/")
    if not url:
        return []
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
            http.get(f"{url}/healthz") as resp,
        ):
            await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        return [
            f"TREEPO_WEIGHTS__PUBLIC_URL: {url} does not answer ({detail}; is the learner running?)"
        ]
    return []


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
    from pipeline.wire.streams import make_client

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
    problems += tokenizer_problems("TREEPO_SAMPLER__MODEL", sampler.sampler.model)
    problems += tokenizer_problems(
        "TREEPO_LEARNER__MODEL", learner.learner.model, learner.learner.chat_template
    )
    if learner.learner.system_prompt and not learner.learner.chat_template:
        problems.append(
            "TREEPO_LEARNER__SYSTEM_PROMPT: needs TREEPO_LEARNER__CHAT_TEMPLATE=true (the system "
            "message goes through the chat template)"
        )
    problems += dataset_problems(learner)
    problems += reward_problems(sampler, learner)
    problems += asyncio.run(redis_problems(learner.redis))
    problems += asyncio.run(weight_url_problems(learner))
    return problems
