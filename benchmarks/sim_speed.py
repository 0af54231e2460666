"""Simulator speed: 1000 queries drawn from chess_trace1 at 2 queries/s (default) on a cluster under
round robin, prefix cache on (the default world); prints wall seconds and simulated LLM calls per
wall-second. Targets: >= 50,000 calls/s on the paper cluster, >= 40,000 on wide-256 (256 engines)
and other clusters, on one core.

`--prefix-cache both` runs cache on and cache off back to back, seed by seed (on a shared machine
both see the same load), and prints their ratio. Calls per CPU-second (process time) are printed
beside the wall figure: other jobs on the machine slow the wall clock, much less the CPU time.

The first line says whether the simulator's hot modules ran compiled with mypyc (`make compile`,
`envs.sim.native`) or as pure Python (a checkout that was not built, e.g. a worktree on PYTHONPATH).

Run: .venv/bin/python benchmarks/sim_speed.py [--cluster paper|wide-256|FILE] [--queries N] [--rate R]
     [--prefix-cache on|off|both] [--policy NAME] [--repeats K]"""

from __future__ import annotations

import argparse
import time

from agentsched.cli import ScriptArgumentParser, run_argparse_script
from envs.sim.native import COMPILED_MODULES, compiled_modules_in_use
from envs.sim.scenario import RunSpec, simulate
from policies import load_policy

TARGET_CALLS_PER_S = {"paper": 50_000}
DEFAULT_TARGET_CALLS_PER_S = 40_000


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = ScriptArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2.0, help="queries/s")
    parser.add_argument("--cluster", default="paper", help="shipped cluster name (paper, wide-256, ...) or YAML file")
    parser.add_argument("--policy", default="rr")
    parser.add_argument("--prefix-cache", choices=("on", "off", "both"), default="on")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    compiled = compiled_modules_in_use()
    pure = [m for m in COMPILED_MODULES if m not in compiled]
    print(f"simulator modules: compiled with mypyc: {', '.join(compiled) or 'none'}; "
          f"pure Python: {', '.join(pure) or 'none'}" + (" (run `make compile`)" if pure else ""))
    modes = ("on", "off") if args.prefix_cache == "both" else (args.prefix_cache,)
    wall_rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu_rates: dict[str, list[float]] = {m: [] for m in modes}
    for seed in range(args.repeats):
        for mode in modes:
            spec = RunSpec(trace="chess_trace1", cluster=args.cluster, rate_qps=args.rate, slo_scale=3.0, seed=seed,
                           queries=args.queries, prefix_cache=mode == "on")
            started, started_cpu = time.perf_counter(), time.process_time()
            result, sim = simulate(spec, load_policy(args.policy))
            wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
            rate, cpu_rate = result["n_calls"] / wall, result["n_calls"] / cpu
            print(f"seed {seed}, cache {mode}: {result['n_workflows']} queries, {result['n_calls']} calls, "
                  f"{sim.decisions} decisions, wall {wall:.3f} s (event loop {sim.wall_s:.3f} s), cpu {cpu:.3f} s, "
                  f"cache hit rate {result['prefix_cache_hit_rate']:.2f} -> {rate:,.0f} calls/s "
                  f"({cpu_rate:,.0f} per CPU-second)")
            wall_rates[mode].append(rate)
            cpu_rates[mode].append(cpu_rate)
    target = TARGET_CALLS_PER_S.get(args.cluster, DEFAULT_TARGET_CALLS_PER_S)
    for mode in modes:
        median = _median(wall_rates[mode])
        print(f"{args.cluster}, prefix cache {mode}: median {median:,.0f} simulated LLM calls per wall-second "
              f"(best {max(wall_rates[mode]):,.0f}; {_median(cpu_rates[mode]):,.0f} per CPU-second); "
              f"target {target:,} -> ratio {median / target:.2f}x")
    if len(modes) == 2:
        print(f"cache on / cache off: {_median(wall_rates['on']) / _median(wall_rates['off']):.2f} (wall), "
              f"{_median(cpu_rates['on']) / _median(cpu_rates['off']):.2f} (CPU)")


if __name__ == "__main__":
    run_argparse_script(main)
