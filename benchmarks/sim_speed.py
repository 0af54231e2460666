"""Simulator speed: 1000 queries drawn from chess_trace1 at 2 queries/s (default) on a cluster under
round robin, prefix cache on (the default world); prints wall seconds and simulated LLM calls per
wall-second. Targets: >= 50,000 calls/s on the paper cluster, >= 40,000 on wide-256 (256 engines)
and other clusters, on one core.

Run: .venv/bin/python benchmarks/sim_speed.py [--cluster paper|wide-256|FILE] [--queries N] [--rate R]
     [--prefix-cache on|off] [--policy NAME] [--repeats K]"""

from __future__ import annotations

import argparse
import time

from envs.sim.scenario import RunSpec, simulate
from policies import load_policy

TARGET_CALLS_PER_S = {"paper": 50_000}
DEFAULT_TARGET_CALLS_PER_S = 40_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2.0, help="queries/s")
    parser.add_argument("--cluster", default="paper", help="shipped cluster name (paper, wide-256, ...) or YAML file")
    parser.add_argument("--policy", default="rr")
    parser.add_argument("--prefix-cache", choices=("on", "off"), default="on")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates = []
    for seed in range(args.repeats):
        spec = RunSpec(trace="chess_trace1", cluster=args.cluster, rate_qps=args.rate, slo_scale=3.0, seed=seed,
                       queries=args.queries, prefix_cache=args.prefix_cache == "on")
        started = time.perf_counter()
        result, sim = simulate(spec, load_policy(args.policy))
        wall = time.perf_counter() - started
        rate = result["n_calls"] / wall
        print(f"seed {seed}: {result['n_workflows']} queries, {result['n_calls']} calls, "
              f"{sim.decisions} decisions, wall {wall:.3f} s (event loop {sim.wall_s:.3f} s), "
              f"cache hit rate {result['prefix_cache_hit_rate']:.2f} -> {rate:,.0f} calls/s")
        rates.append(rate)
    median = sorted(rates)[len(rates) // 2]
    target = TARGET_CALLS_PER_S.get(args.cluster, DEFAULT_TARGET_CALLS_PER_S)
    print(f"{args.cluster}, prefix cache {args.prefix_cache}: median {median:,.0f} simulated LLM calls per "
          f"wall-second (best {max(rates):,.0f}); target {target:,} -> ratio {median / target:.2f}x")


if __name__ == "__main__":
    main()
