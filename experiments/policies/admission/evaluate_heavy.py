"""Test-seed figures of the admission work on the heavy cells (cache on, 240 queries, SLO scale 3):
SLO-goodput per policy with 95% BCa intervals, the paired ratio to least-work+workflow, and the
capacity bound; chess_trace1 (training trace) and chess_trace2 (held out).

    PYTHONPATH=. nice -n 10 .venv/bin/python experiments/policies/admission/evaluate_heavy.py \
        --out experiments/policies/admission/test_results.json NAME=POLICY ...

POLICY is anything `load_policy` takes; the token `tuned` is the per-cell tuned admission heuristic
(tuned/<cluster>-<load>.yaml, tuned on chess_trace1 tuning seeds), `per-cluster` the warm start's
experts (training/configs/experts/least-work+admit-<cluster>.yaml). Results of earlier invocations
in --out are kept (policies are added), so slow networks can be run separately.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from envs.seeds import TEST_SEED_BASE
from envs.sim.capacity import capacity_bound
from envs.sim.cells import Cell
from envs.sim.scenario import simulate
from policies.loader import load_policy
from training.evaluate import bootstrap_mean, bootstrap_ratio

HERE = Path(__file__).resolve().parent
SEEDS = [TEST_SEED_BASE + i for i in range(10)]
BASELINE = "least-work+workflow"


def cells(traces: list[str]) -> list[Cell]:
    return [Cell(trace=t, cluster=c, rate_qps=r, load=load, queries=240) for t in traces
            for c, r in (("paper", 0.2), ("mixed-16", 1.2)) for load in ("constant", "step", "burst")]


_CACHE: dict[str, object] = {}


def _policy(ref: str, cell: Cell):
    if ref == "tuned":
        path = str(HERE / "tuned" / f"{cell.cluster}-{cell.load}.yaml")
    elif ref == "per-cluster":  # the warm start's experts: one setting per cluster
        path = str(HERE.parents[2] / "training" / "configs" / "experts" /
                   f"least-work+admit-{cell.cluster.replace('-', '')}.yaml")
    else:
        path = ref
    if path not in _CACHE:
        _CACHE[path] = load_policy(path)
    return _CACHE[path]


def _run(args: tuple[str, Cell, int]) -> float:
    ref, cell, seed = args
    return float(simulate(cell.run_spec(seed), _policy(ref, cell))[0]["goodput_qps"])


def _bound(args: tuple[Cell, int]) -> float:
    cell, seed = args
    return float(capacity_bound(cell.run_spec(seed)).goodput_bound_qps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--traces", default="chess_trace1,chess_trace2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("policies", nargs="+", help="NAME=POLICY")
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"seeds": SEEDS, "cells": {}}
    todo = [p.split("=", 1) for p in args.policies]
    grid = cells(args.traces.split(","))
    with ProcessPoolExecutor(args.workers) as pool:
        for cell in grid:
            entry = results["cells"].setdefault(cell.label, {"policies": {}})
            if "bound_qps" not in entry:
                entry["bound_qps"] = float(np.mean(list(pool.map(_bound, [(cell, s) for s in SEEDS]))))
            for name, ref in todo:
                entry["policies"][name] = {"ref": ref, "goodput_qps": list(pool.map(_run, [(ref, cell, s) for s in SEEDS]))}
            rng = np.random.default_rng(0)
            base = entry["policies"].get("least-work+workflow")
            for rec in entry["policies"].values():
                g = np.asarray(rec["goodput_qps"])
                rec["mean"] = list(bootstrap_mean(g, 0.95, rng))
                rec["share_of_bound"] = rec["mean"][0] / entry["bound_qps"]
                if base is not None:
                    rec["ratio_to_baseline"] = list(bootstrap_ratio(g, np.asarray(base["goodput_qps"]), 0.95, rng))
            args.out.write_text(json.dumps(results, indent=1))
            print(cell.label, {n: round(r["mean"][0], 4) for n, r in entry["policies"].items()}, flush=True)


if __name__ == "__main__":
    main()
