"""The shipped recipes: their settings load for every process, and the GSM8K preparation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.main import main
from pipeline.config import (
    LearnerSettings,
    SamplerSettings,
    known_env_names,
    load_settings,
    read_env_file,
)
from pipeline.treepo.tasks import gsm8k_answer, load_dataset, reward_fn

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.parent for p in (ROOT / "recipes").glob("*/recipe.env"))


def test_there_are_recipes() -> None:
    assert {p.name for p in RECIPES} >= {"toy", "qwen2.5-math-gsm8k"}
    assert all((p / "README.md").is_file() for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_settings_load_for_every_process(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = read_env_file(recipe / "recipe.env")
    treepo = {k: v for k, v in env.items() if k.startswith("TREEPO_")}
    assert treepo and not (set(treepo) - known_env_names()), set(treepo) - known_env_names()
    for k, v in treepo.items():
        monkeypatch.setenv(k, v)
    learner = load_settings(LearnerSettings, warn=False)
    sampler = load_settings(SamplerSettings, warn=False)
    reward_fn(learner.learner.task)
    reward_fn(sampler.sampler.default_task)
    if recipe.name == "qwen2.5-math-gsm8k":
        assert "\\boxed{}" in learner.learner.system_prompt and learner.learner.chat_template


def test_gsm8k_preparation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gsm8k_answer("She pays 3 * 24 = <<3*24=72>>72 dollars.\n#### 72") == "72"
    assert gsm8k_answer("... #### 1,072") == "1072"
    source = tmp_path / "train.jsonl"
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "Half of 1,000?", "answer": "1000/2=<<1000/2=500>>500\n#### 500"},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gsm8k.jsonl"
    assert main(["data", "gsm8k", str(source), str(out)]) == 0
    problems = load_dataset(out, task="math")
    assert [(p.prompt, p.answer) for p in problems] == [
        (rows[0]["question"], "7"),
        (rows[1]["question"], "500"),
    ]
    # the math reward credits a boxed answer equal to the extracted one
    assert reward_fn("math")("so \\boxed{500}", problems[1].answer) == 1.0
    source.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    assert main(["data", "gsm8k", str(source), str(out)]) == 2
    assert "row 1: field 'answer': no '#### answer' line" in capsys.readouterr().err


QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_qwen2(out: Path) -> Path:
    """A small random-weight Qwen2-architecture model with a byte-level BPE tokenizer and the
    Qwen chat template (what a downloaded instruct model directory looks like)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Tom has 3 apples and buys 4 more. How many apples? \\boxed{7} #### 7"] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT,
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_gsm8k_recipe_runs_end_to_end(tmp_path: Path) -> None:
    """The qwen2.5-math-gsm8k recipe's own settings (chat template, system prompt, math-verify
    reward, data command), with only what a CPU needs changed, through the real learner and
    sampler processes for two steps; the trained directory loads in transformers and vLLM."""

    from pipeline.entry import child_env
    from tests.services import RedisServer, free_port

    model = random_qwen2(tmp_path / "qwen")
    raw = tmp_path / "gsm8k-train.jsonl"
    rows = [
        {
            "question": f"Tom has {a} apples and buys {b} more. How many apples?",
            "answer": f"{a}+{b}={a + b}\n#### {a + b}",
        }
        for a, b in ((3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1))
    ]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "train.jsonl"
    assert main(["data", "gsm8k", str(raw), str(data)]) == 0
    redis = RedisServer(tmp_path / "redis", free_port()).start()
    recipe = read_env_file(ROOT / "recipes" / "qwen2.5-math-gsm8k" / "recipe.env")
    # no TREEPO_* of ours, and no MASTER_PORT an engine built earlier in this pytest process set
    env = child_env()
    env.update({k: v for k, v in recipe.items() if k.startswith("TREEPO_")})
    cpu = {  # what a 2-core machine without a GPU needs instead
        "TREEPO_REDIS__URL": redis.url,
        "TREEPO_LEARNER__MODEL": str(model),
        "TREEPO_SAMPLER__MODEL": str(model),
        "TREEPO_LEARNER__DATASET": str(data),
        "TREEPO_LEARNER__EVAL_DATASET": str(data),
        "TREEPO_LEARNER__EVAL_EVERY": "2",
        "TREEPO_LEARNER__EVAL_SIZE": "2",
        "TREEPO_LEARNER__EVAL_MAX_TOKENS": "8",
        "TREEPO_LEARNER__WORK_DIR": str(tmp_path / "learner"),
        "TREEPO_SAMPLER__WORK_DIR": str(tmp_path / "samplers"),
        "TREEPO_LEARNER__PRECISION": "fp32",
        "TREEPO_LEARNER__ZERO_STAGE": "0",
        "TREEPO_LEARNER__BATCH_PROMPTS": "2",
        "TREEPO_LEARNER__MINI_BATCHES": "1",
        "TREEPO_LEARNER__TOTAL_STEPS": "2",
        "TREEPO_LEARNER__MICRO_BATCH_TOKENS": "0",
        "TREEPO_LEARNER__GRADIENT_CHECKPOINTING": "false",
        "TREEPO_LEARNER__CHECKPOINT_EVERY": "1",
        "TREEPO_LEARNER__HOST": "127.0.0.1",
        "TREEPO_LEARNER__DYNAMIC_SAMPLING": "false",
        "TREEPO_SAMPLER__DTYPE": "float32",
        "TREEPO_SAMPLER__ENFORCE_EAGER": "true",
        "TREEPO_SAMPLER__GPU_MEMORY_UTILIZATION": "0.3",
        "TREEPO_SAMPLER__TREES_IN_FLIGHT": "4",
        "TREEPO_TREE__WIDTH": "4",
        "TREEPO_TREE__SEGMENT_TOKENS": "32",
        "TREEPO_TREE__MAX_DEPTH": "2",
        "TREEPO_TREE__MAX_RESPONSE_TOKENS": "64",
        "TREEPO_STREAMS__BLOCK_MS": "200",
    }
    env.update(cpu)
    kept = {k for k in recipe if k.startswith("TREEPO_") and k not in cpu}
    assert {"TREEPO_LEARNER__CHAT_TEMPLATE", "TREEPO_LEARNER__SYSTEM_PROMPT"} <= kept
    text = run_recipe(env, tmp_path, redis, timeout=600)
    steps = [json.loads(x) for x in (tmp_path / "learner" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    # every leaf was scored by the math reward (math-verify): +1 or -1, no reward errors
    assert all(s["reward"] in (-1.0, 1.0) or -1 <= s["reward"] <= 1 for s in steps)
    assert 'treepo_sampler_reward_errors_total{run="gsm8k"} 0.0' in text
    assert "treepo_sampler_leaves_total" in text
    evals = (tmp_path / "learner" / "evals.jsonl").read_text().splitlines()
    assert len(evals) == 1 and json.loads(evals[0])["problems"] == 2
    # the trained model is a normal Hugging Face directory ...
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = tmp_path / "learner" / "model"
    AutoModelForCausalLM.from_pretrained(str(trained))
    tok = AutoTokenizer.from_pretrained(str(trained))
    assert tok.chat_template == QWEN_CHAT
    # ... that vLLM serves
    import asyncio

    from pipeline.treepo.sampling import PathRequest
    from workers.engine import EngineOptions, VLLMPathGenerator

    engine = VLLMPathGenerator(EngineOptions(model=str(trained), dtype="float32"))
    try:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=True
        )
        ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt

        async def one() -> int:
            return len((await engine.open(PathRequest(list(ids), 4)).next(4)).token_ids)

        assert asyncio.run(one()) >= 1
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_smollm2_recipe_runs_two_steps(tmp_path: Path) -> None:
    """The smollm2-arithmetic recipe (a pretrained Llama-architecture model converted by
    ``treepo model``, a reasoning-gym task, chat template, real EOS) through the real learner and
    sampler processes for two steps, with smaller trees and batches: trees come from the real
    model and are scored by the dataset's verifier, the tree-packed learner computes fewer
    tokens than one row per leaf, the samplers take the learner's weights, and the trained
    model is a normal HF directory."""

    from pipeline.entry import child_env
    from pipeline.treepo.gym import prepare
    from tests.services import RedisServer, free_port
    from tests.test_models import converted

    model = converted()
    train, _, _ = prepare(
        "basic_arithmetic", tmp_path / "data", 20, 4, 0,
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    )  # fmt: skip
    redis = RedisServer(tmp_path / "redis", free_port()).start()
    recipe = read_env_file(ROOT / "recipes" / "smollm2-arithmetic" / "recipe.env")
    env = child_env()
    env.update({k: v for k, v in recipe.items() if k.startswith("TREEPO_")})
    env.update({
        "TREEPO_REDIS__URL": redis.url,
        "TREEPO_LEARNER__MODEL": str(model),
        "TREEPO_SAMPLER__MODEL": str(model),
        "TREEPO_LEARNER__DATASET": str(train),
        "TREEPO_LEARNER__WORK_DIR": str(tmp_path / "learner"),
        "TREEPO_SAMPLER__WORK_DIR": str(tmp_path / "samplers"),
        "TREEPO_LEARNER__BATCH_PROMPTS": "2",
        "TREEPO_LEARNER__TOTAL_STEPS": "2",
        "TREEPO_LEARNER__CHECKPOINT_EVERY": "1",
        "TREEPO_LEARNER__DYNAMIC_SAMPLING": "false",
        "TREEPO_SAMPLER__TREES_IN_FLIGHT": "2",
        "TREEPO_TREE__WIDTH": "4",
        "TREEPO_TREE__MAX_DEPTH": "2",
        "TREEPO_TREE__MAX_RESPONSE_TOKENS": "64",
        "TREEPO_STREAMS__BLOCK_MS": "200",
    })  # fmt: skip
    version = 'treepo_sampler_policy_version{run="smollm2-arithmetic"} 2.0'
    text = run_recipe(env, tmp_path, redis, timeout=800, until=version)
    assert version in text, (tmp_path / "sampler.log").read_text()[-3000:]
    assert 'treepo_sampler_reward_errors_total{run="smollm2-arithmetic"} 0.0' in text
    steps = [json.loads(x) for x in (tmp_path / "learner" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(-1.0 <= s["reward"] <= 1.0 for s in steps)
    # trees from the real model share prefixes: the packed learner computes fewer positions
    assert all(0 < s["tokens_computed"] < s["tokens_per_leaf"] for s in steps), steps
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "learner" / "model"))
    assert type(trained).__name__ == "LlamaForCausalLM"


def run_recipe(
    env: dict[str, str], tmp_path: Path, redis: Any, timeout: float, until: str | None = None
) -> str:
    """``treepo config check`` with ``env`` (must pass), then the real learner and sampler
    processes until the learner ends (must exit 0); returns the sampler's /metrics text, read
    once ``until`` appears in it (or after 60 s). Stops both processes and ``redis``."""
    import subprocess
    import sys
    import urllib.request

    from tests.services import free_port, wait_port

    empty = tmp_path / "empty.env"
    empty.write_text("")
    check = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "--env-file", str(empty), "config", "check"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("learner", "sampler")}
    lport, sport = free_port(), free_port()
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(port)],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=logs[name],
        )
        for name, module, port in (
            ("learner", "learner.process", lport), ("sampler", "workers.sampler", sport)
        )
    }  # fmt: skip
    try:
        code = procs["learner"].wait(timeout=timeout)
        assert code == 0, (tmp_path / "learner.log").read_text()[-3000:]
        wait_port(sport, timeout=10)
        deadline = time.monotonic() + 60
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{sport}/metrics", timeout=5).read()
            if until is None or until in text.decode() or time.monotonic() > deadline:
                return str(text.decode())
            time.sleep(1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs.values():
            f.close()
        redis.kill()
