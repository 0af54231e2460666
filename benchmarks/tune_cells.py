"""Per-cell tuning of the heuristics the benchmark ids compare against: least-work+workflow and
HexGen (TPE), and least-work+workflow with the defer-late admission rule (a grid on top of the
cell's tuned least-work+workflow, then TPE over all its knobs at once from the grid's best setting
of this cell and of every other cell), tuned on every benchmark cell (`envs.gym.benchmark.BENCHMARK_CELLS`: the cluster, rate,
load shape and run length of the id) on tuning seeds disjoint from the test seeds, with the
league's TPE search (`heuristics.league.tune_job`: the policy's shipped knobs are the first
trial, so tuning never reports worse than them on the tuning seeds).

Writes envs/data/benchmark_tuned.json: per id and policy the tuned spec, the tuning seeds' mean
SLO-goodput of the first (shipped) and the best trial. `benchmarks/reference_scores.py` and
`benchmarks/headroom.py` run `least-work+workflow-tuned`, `hexgen-tuned` and `least-work+admit-tuned`
from it.

    PYTHONPATH=. .venv/bin/python benchmarks/tune_cells.py [--trials 40] [--workers 2]
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import typer

from agentsched.cli import run_script
from benchmarks.headroom import TUNED_PATH
from envs.gym.benchmark import BENCHMARK_CELLS
from heuristics.league import mean_goodput, tune_job

TUNE_SEEDS = tuple(range(150000, 150005))  # the league's tuning seeds and two more; the test seeds start at 200000
TUNED_POLICIES = ("least-work+workflow", "hexgen")

ADMIT = "least-work+admit"  # the tuned least-work+workflow with the defer-late admission rule (heuristics.admission)
# defer-late settings tried on top of the tuned least-work+workflow; None (no admission) first
ADMISSION_GRID: list[dict[str, float] | None] = [None] + [
    {"margin": margin, "queue_weight": 0.0, "active_per_engine": cap}
    for margin in (0.0, 1.0, 1.5, 2.0, 2.5) for cap in (0.0, 4.0, 6.0, 8.0, 12.0, 16.0) if (margin, cap) != (0.0, 0.0)]
NO_DEFERRAL = {"margin": 0.0, "queue_weight": 0.0, "active_per_engine": 0.0}  # defer-late that never defers

app = typer.Typer(add_completion=False)


def admit_spec(base: dict[str, Any], knobs: dict[str, float] | None) -> dict[str, Any]:
    """The tuned least-work+workflow spec with defer-late at `knobs` (None: without admission)."""
    spec = {**base, "name": ADMIT}
    if knobs is not None:
        spec["admission"] = {"name": "defer-late", **knobs}
    return spec


def with_admission(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` with a defer-late section (one that never defers if it had none), so that every
    start of the joint search has the same knobs."""
    return spec if "admission" in spec else {**spec, "admission": {"name": "defer-late", **NO_DEFERRAL}}


@app.command()
def main(
    trials: int = typer.Option(40, min=1, help="TPE trials per (id, policy); the first is the shipped knobs"),
    admit_trials: int = typer.Option(40, min=1, help="TPE trials of the joint least-work+admit search per id; "
                                                     "the first ones are the grid's best settings"),
    workers: int = typer.Option(2, min=1, help="worker processes"),
    out: Path = typer.Option(TUNED_PATH, help="the JSON file written"),
) -> None:
    """Tune least-work+workflow and HexGen on every benchmark id's cell; write the specs."""
    started = time.perf_counter()
    jobs = [(env_id, name) for env_id in BENCHMARK_CELLS for name in TUNED_POLICIES]
    table: dict[str, Any] = {"tune_seeds": list(TUNE_SEEDS), "trials": trials,
                             "objective": "mean SLO-goodput (q/s) over the tuning seeds",
                             "command": f"PYTHONPATH=. .venv/bin/python benchmarks/tune_cells.py --trials {trials} "
                                        f"--admit-trials {admit_trials}",
                             "envs": {env_id: {"cell": BENCHMARK_CELLS[env_id].label} for env_id in BENCHMARK_CELLS}}
    with ProcessPoolExecutor(workers) as pool:
        futures = {job: pool.submit(tune_job, job[1], BENCHMARK_CELLS[job[0]], TUNE_SEEDS, trials, 0) for job in jobs}
        for (env_id, name), future in futures.items():
            result = future.result()
            table["envs"][env_id][name] = result
            print(f"{env_id} {name}: {result['start_goodput_qps']:.4f} (shipped) -> {result['tune_goodput_qps']:.4f} "
                  f"(tuned) {result['params']}  [{time.perf_counter() - started:.0f} s]", flush=True)
        # the admission rule on top of each cell's tuned least-work+workflow: a grid, since its best
        # settings sit on the grid's corners (margin 0 = only the cap; cap 0 = only the lateness test)
        for env_id in BENCHMARK_CELLS:
            base = table["envs"][env_id]["least-work+workflow"]
            specs = [admit_spec(base["spec"], knobs) for knobs in ADMISSION_GRID]
            scores = [pool.submit(mean_goodput, spec, BENCHMARK_CELLS[env_id], TUNE_SEEDS) for spec in specs]
            values = [f.result() for f in scores]
            best = max(range(len(values)), key=values.__getitem__)
            table["envs"][env_id][ADMIT] = {"params": ADMISSION_GRID[best] or {}, "tune_goodput_qps": values[best],
                                            "start_goodput_qps": values[0], "spec": specs[best]}
            print(f"{env_id} {ADMIT}: {values[0]:.4f} (tuned least-work+workflow) -> {values[best]:.4f} "
                  f"{ADMISSION_GRID[best]}  [{time.perf_counter() - started:.0f} s]", flush=True)
        # then every knob at once: the grid tunes the rule on top of knobs tuned without it, and the
        # best setting of one cell can be the better start on another (one search per cell, trial 0
        # its own grid best, then the other cells' grid bests)
        grid_best = {env_id: with_admission(table["envs"][env_id][ADMIT]["spec"]) for env_id in BENCHMARK_CELLS}
        joint = {env_id: pool.submit(tune_job, grid_best[env_id], BENCHMARK_CELLS[env_id], TUNE_SEEDS, admit_trials, 0,
                                     [spec for other, spec in grid_best.items() if other != env_id])
                 for env_id in BENCHMARK_CELLS}
        for env_id, future in joint.items():
            result = future.result()
            grid = table["envs"][env_id][ADMIT]
            table["envs"][env_id][ADMIT] = {**result, "start_goodput_qps": grid["start_goodput_qps"],
                                            "grid": {"params": grid["params"], "tune_goodput_qps": grid["tune_goodput_qps"]}}
            print(f"{env_id} {ADMIT} (joint): {grid['tune_goodput_qps']:.4f} (grid) -> {result['tune_goodput_qps']:.4f} "
                  f"{result['params']}  [{time.perf_counter() - started:.0f} s]", flush=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_script(app)
