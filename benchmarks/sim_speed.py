"""Simulator speed: 1000 queries drawn from chess_trace1 at 2 queries/s on the paper cluster
under round robin; prints wall seconds and simulated LLM calls per wall-second (target >= 10,000
calls/s on one core). Run: .venv/bin/python benchmarks/sim_speed.py [--queries N] [--rate R]"""

from __future__ import annotations

import argparse
import time

from envs.sim.scenario import RunSpec, simulate
from policies import load_policy

TARGET_CALLS_PER_S = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--cluster", default="paper")
    parser.add_argument("--policy", default="rr")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates = []
    for seed in range(args.repeats):
        spec = RunSpec(trace="chess_trace1", cluster=args.cluster, rate_qps=args.rate, slo_scale=3.0, seed=seed,
                       queries=args.queries)
        started = time.perf_counter()
        result, sim = simulate(spec, load_policy(args.policy))
        wall = time.perf_counter() - started
        rate = result["n_calls"] / wall
        print(f"seed {seed}: {result['n_workflows']} queries, {result['n_calls']} calls, "
              f"{sim.decisions} decisions, wall {wall:.3f} s (event loop {sim.wall_s:.3f} s) "
              f"-> {rate:,.0f} calls/s")
        rates.append(rate)
    median = sorted(rates)[len(rates) // 2]
    print(f"median: {median:,.0f} simulated LLM calls per wall-second (best {max(rates):,.0f}); "
          f"target {TARGET_CALLS_PER_S:,} -> ratio {median / TARGET_CALLS_PER_S:.2f}x")


if __name__ == "__main__":
    main()
