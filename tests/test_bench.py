"""Every benchmark runs in its quick mode and writes a valid result file (no timing assertions:
CI machines are noisy; the numbers come from full runs, see docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def load(out: Path, name: str) -> dict:  # type: ignore[type-arg]
    data = json.loads((out / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["mode"] == "quick"
    assert data["machine"]["cores"] >= 1 and data["machine"]["python"]
    return data  # type: ignore[no-any-return]


@pytest.mark.slow
def test_transport_quick(tmp_path: Path) -> None:
    from bench import transport

    assert transport.main(["--quick", "--out", str(tmp_path)]) == 0
    d = load(tmp_path, "transport")
    assert d["trees"] == 10 and d["tree"]["leaves"] == 16
    # 62 segments of 512 tokens: 2 + 4 + 8 + 16 + 16 + 16 nodes
    assert d["tree"]["segments"] == 62 and d["tree"]["tokens"] == 62 * 512
    assert d["pipeline_trees_per_second"] > 0 and d["raw_trees_per_second"] > 0
    assert d["pipeline_vs_raw_ratio"] == pytest.approx(
        d["pipeline_trees_per_second"] / d["raw_trees_per_second"]
    )


@pytest.mark.slow
def test_durability_quick(tmp_path: Path) -> None:
    from bench import durability

    assert durability.main(["--quick", "--out", str(tmp_path)]) == 0
    d = load(tmp_path, "durability")
    assert [r["appendfsync"] for r in d["repeats"]] == ["everysec", "always"]
    for kind in ("trees", "prompts"):
        assert d[f"{kind}_per_second_everysec"] > 0 and d[f"{kind}_per_second_always"] > 0
        assert d[f"{kind}_always_vs_everysec"] == pytest.approx(
            d[f"{kind}_per_second_always"] / d[f"{kind}_per_second_everysec"]
        )


@pytest.mark.slow
def test_tree_vs_independent_quick(tmp_path: Path) -> None:
    from bench import tree_vs_independent

    assert tree_vs_independent.main(["--quick", "--out", str(tmp_path)]) == 0
    d = load(tmp_path, "tree_vs_independent")
    assert d["budget_tokens"] == 16 and d["prompts"] == 4 and d["in_flight"] == 2
    base = d["compute_model"]["independent"]["n16"]
    (tree,) = d["compute_model"]["trees"]
    # forced lengths: n=16 decodes 16 x 16 tokens a prompt; the tree (4-token segments, fan-out 2,
    # branching 2, depth 4) decodes (2 + 4 + 8 + 16) x 4 tokens a prompt
    assert base["decoded_tokens"] == 4 * 16 * 16
    assert tree["decoded_tokens"] == 4 * (2 + 4 + 8 + 16) * 4
    assert base["trajectories"] == tree["trajectories"] == 64
    assert d["decoded_tokens_ratio"] == pytest.approx(120 / 256)
    # the trees' own estimate of what independent sampling decodes is exact with forced lengths
    assert tree["independent_tokens_estimate_vs_measured"] == pytest.approx(1.0)
    assert tree["engine_steps"] > 0 and tree["cost_model"]["predicted_vs_measured"] > 0
    # each engine step's time splits into vLLM's step and the sampler's work between steps
    for r in (base, tree):
        inside = r["in_step_ms_per_step"] * r["engine_steps"] / 1000
        between = r["between_steps_ms_per_step"] * r["engine_steps"] / 1000
        assert 0 < inside < r["engine_seconds"]
        assert inside + between == pytest.approx(r["engine_seconds"])
    assert d["trajectories_per_second_ratio"] > 0
    # twice as many prompts as in flight: a new tree starts only when one finishes
    assert 1.0 < tree["mean_trees_in_flight"] <= 2.0


def test_tree_vs_independent_refuses_an_unknown_shape(tmp_path: Path) -> None:
    from bench import tree_vs_independent

    with pytest.raises(SystemExit) as stop:
        tree_vs_independent.main(["--quick", "--out", str(tmp_path), "--shapes", "seg1-d99"])
    assert stop.value.code == 2
    assert not (tmp_path / "tree_vs_independent.json").exists()


@pytest.mark.slow
def test_weight_sync_quick(tmp_path: Path, toy_model: Path) -> None:
    from bench import weight_sync

    assert weight_sync.main(["--quick", "--out", str(tmp_path), "--model", str(toy_model)]) == 0
    d = load(tmp_path, "weight_sync")
    got = {(s["mode"], s["receivers"]): s for s in d["summary"]}
    assert set(got) == {
        ("single", 1), ("cold", 1), ("link", 1), ("full", 1), ("full", 2), ("relay", 2),
        ("host", 2), ("delta", 1), ("blake3", 1)
    }  # fmt: skip
    assert got[("link", 1)]["learner_egress_bytes"] == 0  # same machine: nothing sent
    assert got[("full", 2)]["egress_vs_size"] == pytest.approx(2.0, rel=0.01)
    assert got[("delta", 1)]["egress_vs_size"] < 1.0  # the delta, not the version
    # two samplers of one machine: the learner sends the version once, one links the other's
    assert got[("host", 2)]["egress_vs_size"] == pytest.approx(1.0, rel=0.01)
    host = [r for r in d["rows"] if r["mode"] == "host"]
    assert all(sorted(r["methods"]) == ["full", "host"] for r in host), host
    assert all(s["seconds"] > 0 and s["raw_copy_seconds"] > 0 for s in d["summary"])
    # the raw baseline is the faster of one stream and the receivers' parallel streams
    for r in d["rows"]:
        assert r["raw_copy_seconds"] == min(r["raw_one_stream_seconds"], r["raw_parallel_seconds"])
    for kind in ("fp32", "bf16"):
        c = d["codec"][kind]
        assert c["bit_identical"] and 0 < c["xor_zstd"] < 1


@pytest.mark.slow
def test_learner_packing_quick(tmp_path: Path, toy_model: Path) -> None:
    from bench import learner_packing

    assert learner_packing.main(["--quick", "--out", str(tmp_path), "--model", str(toy_model)]) == 0
    d = load(tmp_path, "learner_packing")
    assert [r["model"] for r in d["rows"]] == ["toy", "compute"]
    for r in d["rows"]:
        assert r["max_abs_logprob_diff"] <= 1e-4  # the two paths compute the same numbers
        assert r["packed_real_tokens"] < r["per_leaf_real_tokens"]  # shared prefixes once
        assert r["sharing_factor"] == pytest.approx(
            r["per_leaf_real_tokens"] / r["packed_real_tokens"]
        )
        assert r["per_leaf_memory"]["peak_rss_mib"] > 0 and r["packed_seconds"] > 0


@pytest.mark.slow
def test_learner_memory_quick(tmp_path: Path) -> None:
    """1k and 2k packed tokens, both heads: the recomputed head keeps less than the head that
    kept its [tokens, vocab] logits, and the kept head's growth is the vocabulary's."""
    from bench import learner_memory

    assert learner_memory.main(["--quick", "--out", str(tmp_path)]) == 0
    d = load(tmp_path, "learner_memory")
    peaks = {(r["tokens"] // 1000, r["head"]): r["peak_mb"] for r in d["rows"]}
    assert peaks[(2, "chunked")] < peaks[(2, "kept")]
    # 1k more tokens keep >= 1k x 151,936 x 4 bytes (600 MB) of logits in the old head
    assert d["mb_per_1k_tokens"]["kept"] > 600
    assert d["mb_per_1k_tokens"]["chunked"] < 300


@pytest.mark.slow
def test_learner_ranks_quick(tmp_path: Path) -> None:
    from bench import learner_ranks

    assert learner_ranks.main(["--quick", "--out", str(tmp_path)]) == 0
    d = load(tmp_path, "learner_ranks")
    rows = {(r["world"], r["stage"], r["rank"]): r for r in d["rows"]}
    assert set(rows) == {(1, 0, 0), (1, 3, 0), (2, 0, 0), (2, 0, 1), (2, 3, 0), (2, 3, 1)}
    # ZeRO-3 on 2 ranks: each holds half the parameters (padding aside) and of the Adam state
    for r in (0, 1):
        s0, s3 = rows[(2, 0, r)], rows[(2, 3, r)]
        assert s3["params_mib"] <= 0.5 * s0["params_mib"] * 1.01
        assert s3["full_params_mib"] == pytest.approx(s0["params_mib"])
    assert 0 < d["fp32"]["zero3_vs_zero0_state_per_rank"] < 1
    assert all(r["step_seconds"] > 0 and r["peak_rss_mib"] > 0 for r in d["rows"])


@pytest.mark.slow
def test_compare_quick_reports_from_the_runs_own_files_and_resumes(
    tmp_path: Path, toy_model: Path
) -> None:
    """2 arms x 2 seeds of real pipeline runs: the numbers of the report are those of each run's
    files, the learning-rate-0 arm is reported as not learning (its trained model answers
    exactly as the untrained one), and a second invocation reruns nothing."""
    from bench import compare

    work = tmp_path / "work"
    args = ["quick", "--out", str(tmp_path), "--work", str(work), "--model", str(toy_model)]
    args += ["--heldout", "10"]
    assert compare.main(args) == 0
    d = load(tmp_path, "compare-quick")
    assert d["seeds"] == 2 and list(d["arms"]) == ["train", "lr-0"] and len(d["runs"]) == 4
    for r in d["runs"]:
        run = work / r["arm"] / f"seed-{r['seed']}"
        steps = (run / "learner" / "steps.jsonl").read_text().splitlines()
        assert r["steps"] == len(steps) >= 1
        assert r["tokens_received"] >= d["budget"]["amount"]  # it stopped on the token budget
        summaries = [json.loads(p.read_text()) for p in (run / "samplers").glob("*/summary.json")]
        decoded = sum(s["treepo_sampler_tokens_decoded_total"] for s in summaries)
        assert r["tokens_decoded"] == decoded > 0
        # a normal end (the learner ends, honcho stops the rest, Redis too) prints no traceback
        assert "Traceback" not in (run / "pipeline.log").read_text()
        env = (run / ".env").read_text()
        assert f"TREEPO_RUN__SEED={r['seed']}" in env
        assert ("TREEPO_LEARNER__LR=0" in env) == (r["arm"] == "lr-0")
        assert r["curve"] and all(0 <= p["accuracy"] <= 1 for p in r["curve"])
    lr0 = d["arms"]["lr-0"]
    assert lr0["learned"] is False
    assert [s["heldout_accuracy"] for s in lr0["seeds"]] == [d["untrained_accuracy"]] * 2
    assert lr0["gain_over_untrained"]["mean"] == 0
    accuracies = [s["heldout_accuracy"] for s in d["arms"]["train"]["seeds"]]
    assert d["arms"]["train"]["heldout_accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    diff = d["paired_differences"]["lr-0 - train"]
    assert diff["mean"] == pytest.approx(d["untrained_accuracy"] - sum(accuracies) / 2)
    assert "lr-0" in (tmp_path / "compare-quick.md").read_text()
    assert (tmp_path / "compare-quick.png").stat().st_size > 0
    runs_before = sorted(p.name for p in (work / "train").iterdir())
    assert compare.main(args) == 0  # resumes: every run is already there
    again = load(tmp_path, "compare-quick")
    assert again["runs"] == d["runs"]
    assert sorted(p.name for p in (work / "train").iterdir()) == runs_before


@pytest.mark.slow
def test_swap_memory_quick(tmp_path: Path, toy_model: Path) -> None:
    from bench import swap_memory

    assert swap_memory.main(["--quick", "--out", str(tmp_path), "--model", str(toy_model)]) == 0
    d = load(tmp_path, "swap_memory")
    assert d["in_process"] is True and d["weight_bytes"] > 0
    for mode in ("disk", "memory"):
        swaps = d["modes"][mode]["swaps"]
        assert len(swaps) == 2 and all(s["loop_wait_seconds"] > 0 for s in swaps)
    assert all(s["read_seconds"] > 0 for s in d["modes"]["memory"]["swaps"])


def test_intervals_over_seeds_use_students_t() -> None:
    from bench.compare import excludes_zero, interval

    iv = interval([0.5, 0.6, 0.7])
    # mean 0.6, sample sd 0.1, t(0.975, 2 df) = 4.303
    assert iv["mean"] == pytest.approx(0.6) and iv["ci95"] == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert interval([0.4])["ci95"] is None and not excludes_zero(interval([0.4]))
    assert excludes_zero(interval([0.1, 0.11, 0.12])) and not excludes_zero(interval([-0.1, 0.1]))


def test_benchmark_tables_match_the_result_files() -> None:
    """docs/benchmarks.md shows exactly what bench/results/ holds (`python -m bench.report`)."""
    from bench import report

    doc = report.DOC.read_text()
    generated = doc.split(report.START, 1)[1].split(report.END, 1)[0]
    assert generated.strip() == report.render().strip(), "run `python -m bench.report`"
    for name, _, _ in report.SECTIONS:
        assert (report.RESULTS / f"{name}.json").is_file(), f"no full result for {name}"
