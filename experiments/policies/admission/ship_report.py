"""The eval_report.json of the shipped Dispatch-v1 policy: `training.evaluate.evaluate` (what
`agentsched evaluate` runs) on the heavy cells of both traces (paper @ 0.2 q/s and mixed-16 @ 1.2 q/s;
constant, step, burst; 240 queries; cache on; SLO scale 3), test seeds 200000-200009, against
least-work+workflow and the per-cluster admission heuristic.

    PYTHONPATH=. nice -n 10 .venv/bin/python experiments/policies/admission/ship_report.py POLICY OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from envs.sim.cells import Cell
from training.evaluate import evaluate, print_table

EXPERTS = Path(__file__).resolve().parents[3] / "training" / "configs" / "experts"

if __name__ == "__main__":
    policy, out = sys.argv[1], Path(sys.argv[2])
    cells = [Cell(trace=t, cluster=c, rate_qps=r, load=load, queries=240, slo_scale=3.0, prefix_cache=True)
             for t in ("chess_trace1", "chess_trace2") for c, r in (("paper", 0.2), ("mixed-16", 1.2))
             for load in ("constant", "step", "burst")]
    results = evaluate(policy, ["least-work+workflow"], cells, list(range(200000, 200010)), out_dir=out, workers=2)
    print_table(results)
