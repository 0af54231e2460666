"""What a planner's fork costs: `envs.sim.fork.fork` of a benchmark cell's run, mid-run.

The lookahead planners fork the simulator for every candidate at every decision, so the fork's cost
(and the rollout's) is their decision time. For each benchmark id the script runs
least-work+workflow to a quarter, a half and three quarters of the arrivals' expected span, then
times `fork` with the unknowns redrawn up to a 20 s horizon (the benchmark lookahead's), `fork`
redrawing every future arrival of the run (what a fork cost before forks took a horizon), and a
20 s rollout of the base policy from the fork. Printed: ms per fork, calls in flight at the fork
point (what a fork copies), ms per rollout, and the planner's cost per decision at top_k=2,
samples=1 (two forks and two rollouts).

Run (about a minute):
    PYTHONPATH=. .venv/bin/python benchmarks/fork_speed.py [--ids ID,ID] [--repeats N]
"""

from __future__ import annotations

import copy
import time

import typer
from rich.console import Console
from rich.table import Table

from agentsched.cli import run_script
from envs.gym.benchmark import BENCHMARK_CELLS
from envs.sim.cluster import ClusterSimulator
from envs.sim.fork import fork
from envs.sim.gc_pause import cyclic_gc_paused
from envs.sim.native import compiled_modules_in_use
from envs.sim.scenario import build_simulator
from policies import load_policy
from policies.base import Policy

HORIZON_S = 20.0
FRACTIONS = (0.25, 0.5, 0.75)
BASE = "least-work+workflow"

app = typer.Typer(add_completion=False)


def measure(sim: ClusterSimulator, policy: Policy, until_s: float, repeats: int) -> tuple[float, float, float]:
    """ms per fork to `until_s`, per fork drawing every future arrival, per rollout to `until_s`."""
    with cyclic_gc_paused():  # as inside a run, where the planners fork
        started = time.perf_counter()
        twins = [fork(sim, 1, policy=copy.deepcopy(policy), until_s=until_s) for _ in range(repeats)]
        forked = time.perf_counter()
        for _ in range(repeats):
            fork(sim, 1, policy=copy.deepcopy(policy))
        full = time.perf_counter()
        for twin in twins:
            twin.run(until_s=until_s)
        done = time.perf_counter()
    return ((forked - started) * 1e3 / repeats, (full - forked) * 1e3 / repeats, (done - full) * 1e3 / repeats)


@app.command()
def main(ids: str = typer.Option(",".join(BENCHMARK_CELLS), help="comma-separated benchmark ids"),
         repeats: int = typer.Option(20, min=1, help="forks timed per point")) -> None:
    wanted = [i for i in ids.split(",") if i]
    for env_id in wanted:
        if env_id not in BENCHMARK_CELLS:
            raise typer.BadParameter(f"{env_id!r} is not a benchmark id (ids: {', '.join(BENCHMARK_CELLS)})",
                                     param_hint="--ids")
    console = Console(width=150)
    console.print(f"compiled modules: {', '.join(compiled_modules_in_use()) or 'none (pure Python)'}")
    table = Table("env id", "at s", "calls in flight", "fork ms", "fork ms (all arrivals)", "rollout ms",
                  "decision ms (2 forks + 2 rollouts)")
    for env_id in wanted:
        cell = BENCHMARK_CELLS[env_id]
        span_s = cell.queries / cell.rate_qps
        for fraction in FRACTIONS:
            policy = load_policy(BASE)
            policy.reset()
            sim = build_simulator(cell.run_spec(200000), policy=policy)
            sim.run(until_s=fraction * span_s)
            until_s = sim.now_s + HORIZON_S
            in_flight = sum(len(s) for wf in sim.workflows if not wf.done for s in wf.stages)
            fork_ms, full_ms, rollout_ms = measure(sim, policy, until_s, repeats)
            table.add_row(env_id.removeprefix("agentsched/"), f"{sim.now_s:.0f}", str(in_flight), f"{fork_ms:.1f}",
                          f"{full_ms:.1f}", f"{rollout_ms:.1f}", f"{2 * (fork_ms + rollout_ms):.0f}")
    console.print(table)


if __name__ == "__main__":
    run_script(app)
