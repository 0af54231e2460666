"""Scan the admission rule's knobs (least-work+workflow + defer-late) on tuning seeds, per heavy cell.

    PYTHONPATH=. nice -n 10 .venv/bin/python experiments/policies/admission/scan.py > experiments/policies/admission/scan.json

Tuning seeds 150000+ (envs/seeds.py), never the test seeds.
"""

from __future__ import annotations

import itertools
import json
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from envs.seeds import TUNE_SEED_BASE
from envs.sim.scenario import simulate
from heuristics.registry import NAMED
from policies.heuristic import HeuristicPolicy
from training.evaluate import Cell

CELLS = [Cell(cluster=c, rate_qps=r, load=load, queries=240) for c, r in (("paper", 0.2), ("mixed-16", 1.2))
         for load in ("constant", "step", "burst")]
SEEDS = [TUNE_SEED_BASE + i for i in range(6)]
MARGINS = (None, 0.8, 1.0, 1.2, 1.5, 2.0)
QUEUE_WEIGHTS = (0.0, 0.1, 0.3)


def policy(margin: float | None, queue_weight: float) -> HeuristicPolicy:
    base = NAMED["least-work+workflow"]
    admission = None if margin is None else {"name": "defer-late", "margin": margin, "queue_weight": queue_weight}
    return HeuristicPolicy.build(base.dispatch, base.local, base.dispatch_knobs, base.local_knobs, admission=admission)


def run(args: tuple[int, float | None, float]) -> dict:
    ci, margin, qw = args
    cell = CELLS[ci]
    p = policy(margin, qw)
    goodput = [simulate(cell.run_spec(s), p)[0]["goodput_qps"] for s in SEEDS]
    return {"cell": cell.label, "margin": margin, "queue_weight": qw, "goodput_qps": float(np.mean(goodput))}


if __name__ == "__main__":
    grid = [(ci, m, q) for ci in range(len(CELLS)) for m, q in itertools.product(MARGINS, QUEUE_WEIGHTS)
            if not (m is None and q > 0)]
    with ProcessPoolExecutor(2) as pool:
        rows = list(pool.map(run, grid))
    json.dump(rows, sys.stdout, indent=1)
