"""The replay of run.sh in the simulator (calibrated engine profiles, no foreign CPU load): the
same load step (base rate for the whole run, the step rate added for the step's duration),
`least-work+workflow` vs `lookahead-knobs`, a few seeds. Usage:
  PYTHONPATH=$PWD .venv/bin/python experiments/lookahead-knobs-live/simulated.py BASE STEP STEP_AT_S STEP_S TOTAL_S"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from benchmarks.sim_vs_real import scaled_trace
from deploy.cluster import load_cluster
from envs.sim.config import ClusterConfig
from envs.sim.scenario import RunSpec, simulate
from envs.sim.workload import PiecewiseArrivals, RateSegment
from policies import load_policy

POLICIES = ("least-work+workflow", "lookahead-knobs:least-work+workflow@interval_s=5,horizon_s=20,samples=1,margin=0.25")


def main(base: float, step: float, step_at_s: float, step_s: float, total_s: float) -> None:
    cluster = load_cluster("deploy/clusters/local-cpu.yaml")
    sim_cluster = ClusterConfig(name="local-cpu", engines=cluster.engine_configs())
    trace = scaled_trace("chess_trace1", Path(tempfile.mkdtemp()) / "trace-x0.05.json", 0.05)
    arrivals = PiecewiseArrivals(segments=[RateSegment(duration_s=step_at_s, rate_qps=base),
                                           RateSegment(duration_s=step_s, rate_qps=base + step),
                                           RateSegment(duration_s=total_s - step_at_s - step_s, rate_qps=base)])
    queries = round(base * total_s + step * step_s)
    out = {}
    for name in POLICIES:
        rows = []
        for seed in (1, 2, 3):
            spec = RunSpec(trace=str(trace), cluster=sim_cluster, rate_qps=base, arrivals=arrivals, slo_scale=3.0,
                           seed=seed, queries=queries, prefix_cache=False)
            policy = load_policy(name)
            result, _ = simulate(spec, policy)
            log = policy.log if hasattr(policy, "log") else []
            rows.append({"seed": seed, "slo_attainment": round(result["slo_attainment"], 3),
                         "decisions": len(log), "knob_changes": sum(e["changed"] for e in log)})
        out[name] = rows
    print(json.dumps({"queries": queries, "policies": out}, indent=1))


if __name__ == "__main__":
    main(*map(float, sys.argv[1:6]))
