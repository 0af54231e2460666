"""The headroom table: how far policies are from what any policy could reach, at sustained load.

Cells: the benchmark cells (`envs.gym.benchmark`): the paper cluster and mixed-16 at their heavy
rates (`HEAVY_RATES_QPS`), each at constant, step and burst load (`training.evaluate.Cell`),
prefix cache on, SLO scale 3. The rates are the ones where, with prefix caching on,
least-work+workflow misses a large share of SLOs at steady state while the capacity bound is still
well above what it reaches (the earlier heavy rates were chosen without the cache, which makes
the same cluster sustain more). For each cell: the capacity bound (`envs.sim.capacity`), the
clairvoyant lookahead (knows true output lengths and arrivals; where affordable), `lookahead`, and
the baselines (`--policies`; `least-work+workflow-tuned` and `hexgen-tuned` carry knobs tuned on the
cell itself, envs/data/benchmark_tuned.json from benchmarks/tune_cells.py; hexgen-tuned falls back
to the league's knobs, heuristics/league/league.json, on cells not tuned there): SLO-goodput means over test seeds with BCa bootstrap intervals
(`training.evaluate.bootstrap_mean`) and as a share of the bound.

Run length: `--choose-length` runs least-work+workflow on each cluster's cells with doubling query
counts and reports the smallest count Q whose share of missed SLOs (mean over seeds and load
shapes) changes by at most `--tolerance` (relative) from Q to 2Q (steady state: more queries no
longer change it). The result is `envs.gym.benchmark.BENCHMARK_QUERIES` and the default here.

The planners fork the simulator at every decision, so they cost orders of magnitude more than a
heuristic; they run only on `--lookahead-cells` and the first `--lookahead-seeds` seeds (at
`--lookahead-queries`, a shorter run: then the baselines of that cell run at that length too).

Run (a few minutes on 2 cores):
    PYTHONPATH=. .venv/bin/python benchmarks/headroom.py --choose-length
    PYTHONPATH=. .venv/bin/python benchmarks/headroom.py --out experiments/headroom
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import typer

from agentsched.cli import run_script
from envs.gym.benchmark import BENCHMARK_QUERIES, CLUSTER_NAMES, HEAVY_RATES_QPS, SHAPE_NAMES
from envs.seeds import TEST_SEED_BASE
from envs.sim.capacity import capacity_bound
from envs.sim.cells import LOADS, Cell
from envs.sim.scenario import simulate
from policies import load_policy
from policies.base import Policy
from policies.loader import policy_from_spec
from policies.lookahead import LookaheadPolicy, is_lookahead_name, lookahead_from_name
from training.evaluate import bootstrap_mean, bootstrap_ratio

LEAGUE_PATH = Path(__file__).resolve().parents[1] / "heuristics" / "league" / "league.json"
TUNED_HEXGEN = "hexgen-tuned"
TUNED_LEAST_WORK = "least-work+workflow-tuned"
TUNED_ADMIT = "least-work+admit-tuned"  # the tuned least-work+workflow + defer-late admission, tuned on the cell
TUNED_NAMES = {"hexgen": TUNED_HEXGEN, "least-work+workflow": TUNED_LEAST_WORK, "least-work+admit": TUNED_ADMIT}
TUNED_BASES = {tuned: base for base, tuned in TUNED_NAMES.items()}
TUNED_PATH = Path(__file__).resolve().parents[1] / "envs" / "data" / "benchmark_tuned.json"  # benchmarks/tune_cells.py
LOOKAHEAD = "lookahead:least-work+workflow@horizon_s=20,samples=1,top_k=2"
CLAIRVOYANT = LOOKAHEAD + ",clairvoyant=true"
LOOKAHEAD_ADMIT = "lookahead:least-work+admit-tuned@horizon_s=20,samples=1,top_k=2"  # over the best hand-written rule
# what knowing the true lengths and arrivals adds to the best rule's dispatch: the reference for how
# much a dispatcher could gain over least-work+admit-tuned at all
CLAIRVOYANT_ADMIT = LOOKAHEAD_ADMIT + ",clairvoyant=true"
PLANNER_LABELS = {LOOKAHEAD: "lookahead", CLAIRVOYANT: "clairvoyant", LOOKAHEAD_ADMIT: "lookahead-admit",
                  CLAIRVOYANT_ADMIT: "clairvoyant-admit"}  # in tables

app = typer.Typer(add_completion=False)


def league_cell_name(cell: Cell) -> str:
    """The league's name of the cell with this cluster and load shape (`paper-burst`, ...)."""
    return f"{CLUSTER_NAMES[cell.cluster]}-{SHAPE_NAMES[cell.load]}"


@lru_cache(maxsize=None)
def read_table(path: Path) -> dict[str, Any]:
    """A shipped JSON table (league, tuned knobs), read once per process: every run asks for it."""
    return json.loads(path.read_text())


def tuned_hexgen(cell: Cell, league_path: Path = LEAGUE_PATH) -> Policy:
    """HexGen with the knobs the league tuned for this cluster and load shape (on tuning seeds;
    the league tuned them at its own heavy rate, so they are reused here, not re-tuned)."""
    cells = {c["name"]: c for c in read_table(league_path)["cells"]}
    knobs = cells[league_cell_name(cell)]["policies"]["hexgen"]["knobs"]
    spec: dict[str, Any] = {"base": "hexgen", "name": TUNED_HEXGEN, "dispatch": {}, "local": {}}
    for key, value in knobs.items():
        section, knob = key.split(".", 1)
        spec[section][knob] = value
    return policy_from_spec(spec, source=f"league {league_cell_name(cell)}")


def cell_tuned(name: str, cell: Cell, tuned_path: Path = TUNED_PATH) -> Policy | None:
    """`name` (a key of TUNED_NAMES) with the knobs benchmarks/tune_cells.py tuned on this very cell
    (tuning seeds), or None if the cell was not tuned there."""
    if not tuned_path.exists():
        return None
    for entry in read_table(tuned_path)["envs"].values():
        if entry["cell"] == cell.label and name in entry:
            spec = dict(entry[name]["spec"])
            spec["name"] = TUNED_NAMES[name]
            return policy_from_spec(spec, source=f"{tuned_path.name} {cell.label}")
    return None


def policy_for(name: str, cell: Cell) -> Policy:
    """A fresh policy for one run. The names of TUNED_NAMES (`least-work+workflow-tuned`,
    `hexgen-tuned`, `least-work+admit-tuned`) carry the knobs tuned on the cell itself
    (benchmarks/tune_cells.py); hexgen-tuned falls back to the league's
    knobs for the cell's cluster and load shape where the cell was not tuned. Any other name goes to
    `load_policy`; a lookahead name's base may be one of them (`lookahead:least-work+admit-tuned@...`)."""
    if is_lookahead_name(name):
        return lookahead_from_name(name, lambda base: policy_for(base, cell))
    if name in TUNED_BASES:
        policy = cell_tuned(TUNED_BASES[name], cell)
        if policy is not None:
            return policy
        if name == TUNED_HEXGEN:
            return tuned_hexgen(cell)
        raise typer.BadParameter(f"{name}: cell {cell.label} is not in {TUNED_PATH.name}; "
                                 "run benchmarks/tune_cells.py or use least-work+workflow")
    return load_policy(name)


def run_policy(name: str, cell: Cell, seed: int) -> dict[str, Any]:
    policy = policy_for(name, cell)
    started = time.perf_counter()
    result, _ = simulate(cell.run_spec(seed), policy)
    out = {"goodput_qps": result["goodput_qps"], "slo_attainment": result["slo_attainment"],
           "wall_s": time.perf_counter() - started}
    if isinstance(policy, LookaheadPolicy):
        out["decision_ms_mean"] = float(np.mean(policy.decision_ms)) if policy.decision_ms else 0.0
        out["planned_decisions"] = len(policy.decision_ms)
        out["changed_decisions"] = policy.changed
    return out


def choose_length(cluster: str, seeds: list[int], start: int, tolerance: float, longest: int) -> tuple[int, list]:
    """Smallest query count Q whose share of missed SLOs under least-work+workflow (mean over seeds
    and the three load shapes) changes by at most `tolerance` (relative) from Q to 2Q; else the
    longest tried. Relative, because short runs miss almost nothing (the cluster starts empty), so
    an absolute change there is small without the queues having settled."""
    history: list[tuple[int, float]] = []
    queries = start
    while queries <= longest:
        att = float(np.mean([run_policy("least-work+workflow", Cell(cluster=cluster, rate_qps=HEAVY_RATES_QPS[cluster],
                                                                    load=load, queries=queries), s)["slo_attainment"]
                             for s in seeds for load in LOADS]))
        history.append((queries, att))
        if len(history) >= 2:
            missed_before, missed = 1.0 - history[-2][1], 1.0 - att
            if missed_before > 0 and abs(missed - missed_before) <= tolerance * missed_before:
                return history[-2][0], history
        queries *= 2
    return history[-1][0], history


@app.command()
def main(
    queries_paper: int = typer.Option(BENCHMARK_QUERIES["paper"], help="queries per run on the paper cluster"),
    queries_mixed: int = typer.Option(BENCHMARK_QUERIES["mixed-16"], help="queries per run on mixed-16"),
    seeds: int = typer.Option(3, min=1, help=f"test seeds (from {TEST_SEED_BASE})"),
    policies: str = typer.Option(f"least-work+workflow,{TUNED_LEAST_WORK},{TUNED_HEXGEN},hexgen,rr",
                                 help="comma-separated baselines"),
    lookahead: str = typer.Option(LOOKAHEAD, help="the lookahead policy ('' to skip)"),
    clairvoyant: str = typer.Option(CLAIRVOYANT, help="the clairvoyant reference ('' to skip)"),
    lookahead_cells: str = typer.Option("paper/burst,mixed-16/burst",
                                        help="cells (cluster/load) where the planners run"),
    lookahead_seeds: int = typer.Option(1, min=1, help="seeds the planners run on"),
    lookahead_queries: int = typer.Option(120, help="queries per planner run (0: the cell's; a shorter run is a "
                                                  "different cell: its baselines are run on it too)"),
    choose: bool = typer.Option(False, "--choose-length", help="only choose the run length (see the docstring)"),
    tolerance: float = typer.Option(0.1, help="--choose-length: relative change of the missed share that counts as steady"),
    longest: int = typer.Option(960, help="--choose-length: the longest run tried"),
    out: Path = typer.Option(None, help="write results.json and table.md here"),
) -> None:
    """Capacity bound, planners and heuristics on sustained-load cells (see the module docstring)."""
    seed_list = [TEST_SEED_BASE + i for i in range(seeds)]
    if choose:
        for cluster in HEAVY_RATES_QPS:
            chosen, history = choose_length(cluster, seed_list, 60, tolerance, longest)
            steps = ", ".join(f"{q}: {a:.3f}" for q, a in history)
            print(f"{cluster}@{HEAVY_RATES_QPS[cluster]:g} q/s, least-work+workflow attainment by queries ({steps}) "
                  f"-> {chosen} queries")
        return
    baselines = [p for p in policies.split(",") if p]
    planners = [n for n in (clairvoyant, lookahead) if n]
    planner_cells = set(filter(None, lookahead_cells.split(",")))
    rows = []
    rng = np.random.default_rng(0)
    for cluster, rate in HEAVY_RATES_QPS.items():
        for load in LOADS:
            queries = queries_paper if cluster == "paper" else queries_mixed
            rows.append(run_cell(Cell(cluster=cluster, rate_qps=rate, load=load, queries=queries), baselines, [],
                                 seed_list, lookahead_seeds, rng))
            if f"{cluster}/{load}" in planner_cells and planners:
                # the planners' shorter run is its own cell: the baselines run on it too
                short = Cell(cluster=cluster, rate_qps=rate, load=load, queries=lookahead_queries or queries)
                rows.append(run_cell(short, baselines, planners, seed_list, lookahead_seeds, rng))
    table = markdown(rows, seed_list)
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        (out / "table.md").write_text(table)


def run_cell(cell: Cell, baselines: list[str], planners: list[str], seed_list: list[int], planner_seeds: int,
             rng: np.random.Generator) -> dict[str, Any]:
    """One table row: the bound, every baseline on every seed, the planners on the first seeds."""
    bounds = [capacity_bound(cell.run_spec(s)) for s in seed_list]
    entries: dict[str, dict[str, Any]] = {}
    for name in baselines + planners:
        use = seed_list[:planner_seeds] if name in planners else seed_list
        runs = [run_policy(name, cell, s) for s in use]
        g = np.array([r["goodput_qps"] for r in runs])
        mean, lo, hi = bootstrap_mean(g, 0.95, rng)
        bound_same = float(np.mean([bounds[seed_list.index(s)].goodput_bound_qps for s in use]))
        entry = {"seeds": use, "goodput_qps": [mean, lo, hi], "per_seed": g.tolist(), "share_of_bound": mean / bound_same,
                 "slo_attainment": float(np.mean([r["slo_attainment"] for r in runs])),
                 "wall_s_per_run": float(np.mean([r["wall_s"] for r in runs]))}
        if "decision_ms_mean" in runs[0]:
            entry["decision_ms_mean"] = float(np.mean([r["decision_ms_mean"] for r in runs]))
            entry["changed_share"] = float(sum(r["changed_decisions"] for r in runs) /
                                           max(1, sum(r["planned_decisions"] for r in runs)))
        reference = entries.get("least-work+workflow")
        if reference is not None and name in planners:
            # paired with the heuristic on the planner's own seeds
            same = np.array([reference["per_seed"][seed_list.index(s)] for s in use])
            entry["vs_least_work_workflow"] = list(bootstrap_ratio(g, same, 0.95, rng))
        entries[label(name)] = entry
        print(f"{cell.label} q={cell.queries} {label(name)}: goodput {mean:.4f} [{lo:.4f}, {hi:.4f}] "
              f"({entry['share_of_bound']:.2f} of bound) attainment {entry['slo_attainment']:.3f} "
              f"{entry['wall_s_per_run']:.1f} s/run", flush=True)
    return {"cell": cell.label, "queries": cell.queries, "rate_qps": float(np.mean([b.rate_qps for b in bounds])),
            "capacity_qps": float(np.mean([b.capacity_qps for b in bounds])),
            "goodput_bound_qps": float(np.mean([b.goodput_bound_qps for b in bounds])), "policies": entries}


def label(name: str) -> str:
    return PLANNER_LABELS.get(name, name)


def markdown(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    lines = [f"SLO-goodput (q/s), mean [95% BCa interval] over test seeds {seeds[0]}-{seeds[-1]} (planners: the "
             f"seeds listed in results.json), and as a share of the capacity bound.", "",
             "| cell | queries | offered q/s | capacity q/s | bound q/s | policy | SLO-goodput | share of bound | "
             "attainment | decision ms | / least-work+workflow, same seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, e in row["policies"].items():
            g = e["goodput_qps"]
            ms = f"{e['decision_ms_mean']:.1f}" if "decision_ms_mean" in e else ""
            r = e.get("vs_least_work_workflow")
            ratio = f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]" if r else ""
            lines.append(f"| {row['cell']} | {row['queries']} | {row['rate_qps']:.3f} | {row['capacity_qps']:.3f} | "
                         f"{row['goodput_bound_qps']:.4f} | {name} | {g[0]:.4f} [{g[1]:.4f}, {g[2]:.4f}] | "
                         f"{e['share_of_bound']:.2f} | {e['slo_attainment']:.3f} | {ms} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(app)
