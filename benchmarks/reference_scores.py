"""Reference scores of the benchmark env ids (`envs.gym.benchmark`): the shipped table
envs/data/benchmark_scores.json (and .md), read by `envs.gym.benchmark.reference_scores(env_id)`.

For every id, on its fixed test episodes (`TEST_SEEDS`, the `split="test"` episodes of the env):
random, rr, HexGen, HexGen and the best heuristic (least-work+workflow, which is also what an agent
dispatching like it scores in the env, see the envs.gym.benchmark docstring) with their shipped
knobs and with knobs tuned on the id's own cell (`hexgen-tuned`, `least-work+workflow-tuned`:
envs/data/benchmark_tuned.json, benchmarks/tune_cells.py, tuning seeds), the tuned
least-work+workflow with the defer-late admission rule, every knob of both tuned together on the cell
(`least-work+admit-tuned`, the best hand-written policy here), the shipped learned policy (policies/pretrained/learned), optionally `lookahead` (`--lookahead-ids`: it forks the
simulator at every decision, so a benchmark-length run of it costs minutes per seed), and the
capacity bound (`envs.sim.capacity`): mean SLO-goodput (q/s) with a 95% BCa bootstrap interval
over the seeds (`training.evaluate.bootstrap_mean`), per-seed values, mean SLO attainment and the
share of the bound. Each run is `envs.sim.scenario.simulate(env.run_spec(seed), policy)`.

Run (about 3 minutes on 2 cores without lookahead):
    PYTHONPATH=. .venv/bin/python benchmarks/reference_scores.py
    PYTHONPATH=. .venv/bin/python benchmarks/reference_scores.py --lookahead-ids agentsched/Dispatch-paper-burst-v1 --lookahead-seeds 1
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import typer

from benchmarks.headroom import LOOKAHEAD, TUNED_ADMIT, TUNED_HEXGEN, TUNED_LEAST_WORK, run_policy
from envs.gym.benchmark import BENCHMARK_CELLS, BENCHMARK_VERSION, LOCAL_KNOBS, LOCAL_ORDER, SCORES_PATH, TEST_SEEDS
from envs.sim.capacity import capacity_bound
from training.evaluate import bootstrap_mean, bootstrap_ratio

LEARNED = "policies/pretrained/learned"  # the shipped learned policy (admission + dispatch network)
POLICIES = ("random", "rr", "hexgen", TUNED_HEXGEN, "least-work+workflow", TUNED_LEAST_WORK, TUNED_ADMIT, LEARNED)
BEST_HEURISTIC = "least-work+workflow"
RATIO_BASES = (BEST_HEURISTIC, TUNED_LEAST_WORK, TUNED_ADMIT)  # what the learned policy's ratios are to
BOUND = "capacity-bound"
CONFIDENCE = 0.95

app = typer.Typer(add_completion=False)


def summarize(goodput: list[float], attainment: list[float] | None, seeds: list[int], bound_mean: float,
              rng: np.random.Generator, **extra: Any) -> dict[str, Any]:
    mean, lo, hi = bootstrap_mean(np.array(goodput), CONFIDENCE, rng)
    out = {"goodput_qps": {"mean": mean, "lo": lo, "hi": hi}, "per_seed": goodput, "seeds": seeds,
           "share_of_bound": mean / bound_mean if bound_mean > 0 else None, **extra}
    if attainment is not None:
        out["slo_attainment"] = float(np.mean(attainment))
    return out


@app.command()
def main(
    seeds: int = typer.Option(len(TEST_SEEDS), min=1, max=len(TEST_SEEDS), help="test seeds used (the first N)"),
    lookahead_ids: str = typer.Option("", help="comma-separated ids where lookahead runs ('' for none)"),
    lookahead_seeds: int = typer.Option(1, min=1, help="seeds lookahead runs on (the first N)"),
    workers: int = typer.Option(2, min=1, help="processes the lookahead runs share (they run beside the rest)"),
    out: Path = typer.Option(SCORES_PATH, help="the JSON table (a .md table is written next to it)"),
) -> None:
    """Measure the reference scores of every benchmark id and write the table."""
    seed_list = list(TEST_SEEDS[:seeds])
    planned = set(filter(None, lookahead_ids.split(",")))
    unknown = planned - set(BENCHMARK_CELLS)
    if unknown:
        raise typer.BadParameter(f"unknown id {sorted(unknown)[0]} (ids: {', '.join(BENCHMARK_CELLS)})",
                                 param_hint="--lookahead-ids")
    rng = np.random.default_rng(0)
    previous = json.loads(out.read_text()) if out.exists() else {"envs": {}}
    table: dict[str, Any] = {
        "version": BENCHMARK_VERSION, "metric": "SLO-goodput (q/s): SLO-met workflows per second of the run",
        "confidence": CONFIDENCE, "test_seeds": seed_list, "best_heuristic": BEST_HEURISTIC,
        "env_local_order": {"name": LOCAL_ORDER, **LOCAL_KNOBS}, "lookahead": LOOKAHEAD,
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/reference_scores.py"
                   + (f" --lookahead-ids {lookahead_ids} --lookahead-seeds {lookahead_seeds}" if planned else ""),
        "envs": {}}
    pool = ProcessPoolExecutor(workers)  # the lookahead runs (minutes per seed) start at once, beside the rest
    planned_runs = {(env_id, s): pool.submit(run_policy, LOOKAHEAD, cell, s)
                    for env_id, cell in BENCHMARK_CELLS.items() if env_id in planned for s in seed_list[:lookahead_seeds]}
    for env_id, cell in BENCHMARK_CELLS.items():
        started = time.perf_counter()
        bounds = [capacity_bound(cell.run_spec(s)).goodput_bound_qps for s in seed_list]
        bound_mean = float(np.mean(bounds))
        entries: dict[str, Any] = {BOUND: summarize(bounds, None, seed_list, bound_mean, rng)}
        for name in POLICIES:
            runs = [run_policy(name, cell, s) for s in seed_list]
            entries[name] = summarize([r["goodput_qps"] for r in runs], [r["slo_attainment"] for r in runs], seed_list,
                                      bound_mean, rng)
        learned = np.array(entries[LEARNED]["per_seed"])
        entries[LEARNED]["ratio_to"] = {}
        for base in RATIO_BASES:
            ratio, lo, hi = bootstrap_ratio(learned, np.array(entries[base]["per_seed"]), CONFIDENCE, rng)
            entries[LEARNED]["ratio_to"][base] = {"mean": ratio, "lo": lo, "hi": hi}
        if env_id in planned:
            use = seed_list[:lookahead_seeds]
            runs = [planned_runs[(env_id, s)].result() for s in use]
            same_bound = float(np.mean(bounds[:len(use)]))
            entries["lookahead"] = summarize([r["goodput_qps"] for r in runs], [r["slo_attainment"] for r in runs], use,
                                             same_bound, rng,
                                             decision_ms_mean=float(np.mean([r["decision_ms_mean"] for r in runs])),
                                             best_heuristic_same_seeds=float(np.mean(entries[BEST_HEURISTIC]["per_seed"][:len(use)])))
        elif (carried := carried_lookahead(previous, env_id, cell)) is not None:  # an earlier run's: minutes per seed
            entries["lookahead"] = carried
        else:
            entries["lookahead"] = {"measured": False,
                                    "note": "not measured on this id (a benchmark-length lookahead run costs minutes per "
                                            "seed); see experiments/headroom/table.md for lookahead on shorter runs"}
        table["envs"][env_id] = {"cell": {**asdict(cell), "label": cell.label}, "policies": entries}
        best = entries[BEST_HEURISTIC]["goodput_qps"]
        print(f"{env_id}: bound {bound_mean:.4f}, {BEST_HEURISTIC} {best['mean']:.4f} [{best['lo']:.4f}, {best['hi']:.4f}] "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    pool.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))


def carried_lookahead(previous: dict[str, Any], env_id: str, cell: Any) -> dict[str, Any] | None:
    """The lookahead entry an earlier table measured on this id's very cell, marked with the
    command that measured it; None if it has none."""
    env = previous["envs"].get(env_id)
    if env is None or env["cell"] != {**asdict(cell), "label": cell.label}:
        return None
    entry = env["policies"].get("lookahead", {})
    if not entry.get("measured", True):
        return None
    return {**entry, "measured_by": entry.get("measured_by", previous.get("command", ""))}


def markdown(table: dict[str, Any]) -> str:
    seeds = table["test_seeds"]
    lines = [f"Reference SLO-goodput (q/s) of the benchmark ids: mean [{int(table['confidence'] * 100)}% BCa interval] "
             f"over test seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} seeds), share of the capacity bound, SLO attainment. "
             f"Written by `{table['command']}`.", "",
             "| env id | policy | SLO-goodput | share of bound | attainment | seeds |", "|---|---|---|---|---|---|"]
    carried = []
    for env_id, env in table["envs"].items():
        for name, e in env["policies"].items():
            if not e.get("measured", True):
                lines.append(f"| {env_id} | {name} | not measured | | | |")
                continue
            if "measured_by" in e:
                carried.append(f"{env_id} {name}: `{e['measured_by']}`")
            g = e["goodput_qps"]
            share = "" if e.get("share_of_bound") is None else f"{e['share_of_bound']:.2f}"
            att = f"{e['slo_attainment']:.3f}" if "slo_attainment" in e else ""
            lines.append(f"| {env_id} | {name} | {g['mean']:.4f} [{g['lo']:.4f}, {g['hi']:.4f}] | {share} | {att} | "
                         f"{len(e['seeds'])} |")
    if carried:
        lines += ["", "Kept from the earlier run that measured them: " + "; ".join(carried) + "."]
    planned = [(env_id, e) for env_id, env in table["envs"].items()
               if (e := env["policies"].get("lookahead")) and e.get("measured", True)]
    if planned:
        lines += ["", f"`{table['lookahead']}` against its base on the same seeds, and its mean decision time:", "",
                  "| env id | seeds | lookahead | least-work+workflow | ratio | decision ms |", "|---|---|---|---|---|---|"]
        for env_id, e in planned:
            base = e["best_heuristic_same_seeds"]
            lines.append(f"| {env_id} | {', '.join(map(str, e['seeds']))} | {e['goodput_qps']['mean']:.4f} | {base:.4f} | "
                         f"{e['goodput_qps']['mean'] / base:.3f} | {e['decision_ms_mean']:.0f} |")
    lines += ["", f"SLO-goodput of {LEARNED} over least-work+workflow with its shipped knobs, with its per-cell tuned "
              "knobs, and with the defer-late admission rule added and every knob tuned together on the cell (ratio of "
              "means, paired BCa "
              "interval over the same seeds):", "",
              "| env id | " + " | ".join(f"/ {b}" for b in RATIO_BASES) + " |", "|---|" + "---|" * len(RATIO_BASES)]
    for env_id, env in table["envs"].items():
        ratios = env["policies"][LEARNED].get("ratio_to", {})
        cells = [f"{r['mean']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]" if r else "" for r in map(ratios.get, RATIO_BASES)]
        lines.append(f"| {env_id} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app()
