"""Soak run (``make soak``): the real pipeline under random SIGKILLs for a fixed time, then a
ledger check.

redis-server (ops/ config: AOF ``everysec``, ACL users), one learner and two samplers on the toy
model run for ``--minutes``; at random moments (every ``--min-gap``..``--max-gap`` seconds) one
of them, chosen at random, is SIGKILLed and started again. At the end the learner is stopped with
SIGTERM and ``learner.ledger.audit`` checks its checkpoint and step log: every admitted prompt
trained, dropped for no signal or abandoned (each counted), or still outstanding; none lost; no
tree trained by two steps. Results: ``bench/results/soak.json`` (``--quick``: a short run into
``runs/bench-quick/``), summarised in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import time
from dataclasses import asdict
from pathlib import Path

from bench.cluster import ROOT, Cluster
from bench.common import write_result
from learner.ledger import audit

SETTINGS = {
    "TREEPO_RUN__NAME": "soak",
    "TREEPO_RUN__MAX_STALENESS": "1",
    "TREEPO_TREE__WIDTH": "4",
    "TREEPO_TREE__SEGMENT_TOKENS": "6",
    "TREEPO_TREE__MAX_DEPTH": "6",
    "TREEPO_SAMPLER__TREES_IN_FLIGHT": "2",
    "TREEPO_SAMPLER__ALLOW_SHORT_SEGMENTS": "true",
    "TREEPO_LEARNER__BATCH_PROMPTS": "4",
    "TREEPO_LEARNER__TOTAL_STEPS": "1000000",
    "TREEPO_LEARNER__LR": "1e-5",
    "TREEPO_LEARNER__READMIT_AFTER_S": "60",
    "TREEPO_LEARNER__DYNAMIC_SAMPLING": "false",  # the test toy is mostly wrong: few mixed trees
    "TREEPO_STREAMS__BLOCK_MS": "200",
    "TREEPO_STREAMS__CLAIM_IDLE_MS": "10000",
}
VICTIMS = ("sampler-0", "sampler-1", "learner", "redis")


def toy_model() -> Path:
    from tests.helpers import TOY_TEST_SPEC
    from toy.kit import ToySpec, build_toy_model

    spec = ToySpec(**TOY_TEST_SPEC)  # type: ignore[arg-type]
    return build_toy_model(ROOT / ".cache" / "toy-test", seed=0, spec=spec)


def soak(root: Path, minutes: float, gaps: tuple[float, float], seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    cluster = Cluster(root, toy_model(), dict(SETTINGS))
    started = time.monotonic()
    cluster.start(samplers=2)
    kills: list[dict[str, object]] = []
    learner_crashes = 0
    try:
        while cluster.step() < 1:
            time.sleep(1)
            if time.monotonic() - started > 600:
                raise RuntimeError("no first step:\n" + cluster.log_tail("learner"))
        deadline = time.monotonic() + minutes * 60
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(*gaps))
            if not cluster.running("learner"):  # a crash is a finding: count it, start again
                learner_crashes += 1
                print(cluster.log_tail("learner"), flush=True)
                cluster.start_learner()
                continue
            victim = rng.choice(VICTIMS)
            kills.append(
                {
                    "at_s": round(time.monotonic() - started, 1),
                    "victim": victim,
                    "step": cluster.step(),
                }
            )
            print(
                f"[{kills[-1]['at_s']:7.1f}s] step {kills[-1]['step']}: SIGKILL {victim}",
                flush=True,
            )
            cluster.restart(victim)
        # let the last restart settle, then stop the learner cleanly and check the ledger
        settle = time.monotonic() + 180
        step = cluster.step()
        while cluster.step() < step + 2 and time.monotonic() < settle:
            time.sleep(1)
        stop_seconds = cluster.send("learner", signal.SIGTERM)
    finally:
        cluster.stop()
    result = audit(cluster.work)
    state = cluster.state() or {}
    ledger = state.get("ledger", {})
    by_victim = {v: sum(1 for k in kills if k["victim"] == v) for v in VICTIMS}
    return {
        "minutes": minutes,
        "wall_seconds": round(time.monotonic() - started, 1),
        "kills": len(kills),
        "kills_by_victim": by_victim,
        "learner_crashes": learner_crashes,
        "learner_sigterm_seconds": round(stop_seconds, 2),
        "steps": state.get("step"),
        "audit": {**asdict(result), "ok": result.ok},
        "readmitted_lost": ledger.get("readmitted_lost", 0),
        "readmitted_stale": ledger.get("readmitted_stale", 0),
        "dropped_stale": state.get("dropped_stale"),
        "kill_log": kills,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--min-gap", type=float, default=25.0)
    parser.add_argument("--max-gap", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 minutes, results in runs/")
    parser.add_argument("--out", type=Path, default=None, help="result folder (default by mode)")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.min_gap, args.max_gap = 3.0, 20.0, 35.0
    root = ROOT / "runs" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    result = soak(root, args.minutes, (args.min_gap, args.max_gap), args.seed)
    write_result("soak", args, result)
    audit_ = result["audit"]
    print(json.dumps({k: v for k, v in result.items() if k != "kill_log"}, indent=2))
    print(
        f"lost {len(audit_['lost'])}, trained twice {len(audit_['trained_twice'])}, "  # type: ignore[index]
        f"kills {result['kills']}: {'OK' if audit_['ok'] else 'FAILED'}"
    )  # type: ignore[index]
    raise SystemExit(0 if audit_["ok"] else 1)  # type: ignore[index]


if __name__ == "__main__":
    main()
