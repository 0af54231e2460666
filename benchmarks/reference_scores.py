"""Reference scores of the benchmark env ids (`envs.gym.benchmark`): the shipped table
envs/data/benchmark_scores.json (and .md), read by `envs.gym.benchmark.reference_scores(env_id)`.

For every id, on its fixed test episodes (`TEST_SEEDS`, the `split="test"` episodes of the env):
random, rr, HexGen, HexGen and the best heuristic (least-work+workflow, which is also what an agent
dispatching like it scores in the env, see the envs.gym.benchmark docstring) with their shipped
knobs and with knobs tuned on the id's own cell (`hexgen-tuned`, `least-work+workflow-tuned`:
envs/data/benchmark_tuned.json, benchmarks/tune_cells.py, tuning seeds), the tuned
least-work+workflow with the defer-late admission rule, every knob of both tuned together on the cell
(`least-work+admit-tuned`, the best hand-written policy here), the shipped learned policy (policies/pretrained/learned), optionally the planners (`--planner-ids`:
they fork the simulator at every decision, so a benchmark-length run costs minutes per seed):
`lookahead` over least-work+workflow, its `clairvoyant` twin (true output lengths and arrivals: not
deployable, the empirical upper reference), `lookahead-admit`, lookahead over
least-work+admit-tuned, and its `clairvoyant-admit` twin (what knowing the future adds to the best
rule's dispatch); each is also compared to its base on the same seeds. And the
capacity bound (`envs.sim.capacity`): mean SLO-goodput (q/s) with a 95% BCa bootstrap interval
over the seeds (`training.evaluate.bootstrap_mean`), per-seed values, mean SLO attainment and the
share of the bound. Each run is `envs.sim.scenario.simulate(env.run_spec(seed), policy)`.

Run (about 3 minutes on 2 cores without planners; a planner run takes 2-6 minutes per id and seed):
    PYTHONPATH=. .venv/bin/python benchmarks/reference_scores.py
    PYTHONPATH=. .venv/bin/python benchmarks/reference_scores.py --planner-ids all --planner-seeds 2

Planner entries an earlier table measured on the same cell are kept (marked with their command)
where this run does not measure them. Every entry's bootstrap draws from its own generator, seeded
by the id and the entry's name, so its interval does not depend on which other entries a run
measured; `--intervals-only` recomputes the intervals of the shipped table from its per-seed values
(no simulation).
"""

from __future__ import annotations

import contextlib
import json
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import typer

from agentsched.cli import run_script
from benchmarks.headroom import (
    CLAIRVOYANT,
    CLAIRVOYANT_ADMIT,
    LOOKAHEAD,
    LOOKAHEAD_ADMIT,
    PLANNER_LABELS,
    TUNED_ADMIT,
    TUNED_HEXGEN,
    TUNED_LEAST_WORK,
    run_policy,
)
from envs.gym.benchmark import BENCHMARK_CELLS, BENCHMARK_VERSION, LOCAL_KNOBS, LOCAL_ORDER, SCORES_PATH, TEST_SEEDS
from envs.sim.capacity import capacity_bound
from training.evaluate import bootstrap_mean, bootstrap_ratio

LEARNED = "policies/pretrained/learned"  # the shipped learned policy (admission + dispatch network)
POLICIES = ("random", "rr", "hexgen", TUNED_HEXGEN, "least-work+workflow", TUNED_LEAST_WORK, TUNED_ADMIT, LEARNED)
BEST_HEURISTIC = "least-work+workflow"
RATIO_BASES = (BEST_HEURISTIC, TUNED_LEAST_WORK, TUNED_ADMIT)  # what the learned policy's ratios are to
BOUND = "capacity-bound"
# planner label -> (policy name, the base it is compared with on the same seeds)
PLANNERS = {PLANNER_LABELS[name]: (name, base)
            for name, base in ((LOOKAHEAD, BEST_HEURISTIC), (CLAIRVOYANT, BEST_HEURISTIC), (LOOKAHEAD_ADMIT, TUNED_ADMIT),
                               (CLAIRVOYANT_ADMIT, TUNED_ADMIT))}
CONFIDENCE = 0.95

app = typer.Typer(add_completion=False)


def entry_rng(env_id: str, *names: str) -> np.random.Generator:
    """The bootstrap generator of one table entry (an id's policy, or a ratio of two), seeded by
    its names alone: the entry's interval is the same whatever else the run measured."""
    return np.random.default_rng(zlib.crc32("/".join((env_id, *names)).encode()))


def goodput_interval(goodput: list[float], env_id: str, name: str) -> dict[str, float]:
    mean, lo, hi = bootstrap_mean(np.array(goodput), CONFIDENCE, entry_rng(env_id, name))
    return {"mean": mean, "lo": lo, "hi": hi}


def ratio_interval(policy: list[float], base: list[float], env_id: str, name: str, base_name: str) -> dict[str, float]:
    ratio, lo, hi = bootstrap_ratio(np.array(policy), np.array(base), CONFIDENCE, entry_rng(env_id, name, base_name))
    return {"mean": ratio, "lo": lo, "hi": hi}


def refresh_intervals(table: dict[str, Any]) -> None:
    """Recompute every interval of `table` from its per-seed values (the means stay)."""
    for env_id, env in table["envs"].items():
        entries = env["policies"]
        for name, entry in entries.items():
            if "per_seed" in entry:
                entry["goodput_qps"] = goodput_interval(entry["per_seed"], env_id, name)
        for base in entries[LEARNED].get("ratio_to", {}):
            entries[LEARNED]["ratio_to"][base] = ratio_interval(entries[LEARNED]["per_seed"], entries[base]["per_seed"],
                                                                env_id, LEARNED, base)


def summarize(goodput: list[float], attainment: list[float] | None, seeds: list[int], bound_mean: float,
              env_id: str, name: str, **extra: Any) -> dict[str, Any]:
    interval = goodput_interval(goodput, env_id, name)
    mean = interval["mean"]
    out = {"goodput_qps": interval, "per_seed": goodput, "seeds": seeds,
           "share_of_bound": mean / bound_mean if bound_mean > 0 else None, **extra}
    if attainment is not None:
        out["slo_attainment"] = float(np.mean(attainment))
    return out


@app.command()
def main(
    seeds: int = typer.Option(len(TEST_SEEDS), min=1, max=len(TEST_SEEDS), help="test seeds used (the first N)"),
    planner_ids: str = typer.Option("", help="comma-separated ids where the planners run, 'all', or '' for none"),
    planners: str = typer.Option(",".join(PLANNERS), help=f"comma-separated planners ({', '.join(PLANNERS)})"),
    planner_seeds: int = typer.Option(1, min=1, max=len(TEST_SEEDS), help="seeds the planners run on (the first N)"),
    workers: int = typer.Option(2, min=1, help="processes the planner runs share (they run beside the rest)"),
    out: Path = typer.Option(SCORES_PATH, help="the JSON table (a .md table is written next to it)"),
    intervals_only: bool = typer.Option(False, help="recompute the intervals of the table at --out from its "
                                                    "per-seed values, run nothing"),
) -> None:
    """Measure the reference scores of every benchmark id and write the table."""
    if intervals_only:
        if not out.exists():
            raise typer.BadParameter(f"{out} does not exist (measure the table first)", param_hint="--out")
        shipped = json.loads(out.read_text())
        refresh_intervals(shipped)
        write_table(shipped, out)
        return
    seed_list = list(TEST_SEEDS[:seeds])
    planned = set(BENCHMARK_CELLS) if planner_ids == "all" else set(filter(None, planner_ids.split(",")))
    unknown = planned - set(BENCHMARK_CELLS)
    if unknown:
        raise typer.BadParameter(f"unknown id {sorted(unknown)[0]} (ids: all, {', '.join(BENCHMARK_CELLS)})",
                                 param_hint="--planner-ids")
    chosen = [p for p in planners.split(",") if p]
    if not chosen or (bad := [p for p in chosen if p not in PLANNERS]):
        raise typer.BadParameter(f"unknown planner {bad[0] if chosen else repr(planners)} "
                                 f"(planners: {', '.join(PLANNERS)})", param_hint="--planners")
    previous = json.loads(out.read_text()) if out.exists() else {"envs": {}}
    table: dict[str, Any] = {
        "version": BENCHMARK_VERSION, "metric": "SLO-goodput (q/s): SLO-met workflows per second of the run",
        "confidence": CONFIDENCE, "test_seeds": seed_list, "best_heuristic": BEST_HEURISTIC,
        "env_local_order": {"name": LOCAL_ORDER, **LOCAL_KNOBS},
        "planners": {label: {"policy": name, "base": base} for label, (name, base) in PLANNERS.items()},
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/reference_scores.py"
                   + (f" --planner-ids {planner_ids} --planners {','.join(chosen)} --planner-seeds {planner_seeds}"
                      if planned else ""),
        "envs": {}}
    planner_seed_list = seed_list[:planner_seeds]
    # the planner runs (minutes per seed) start at once, beside the rest; none: no pool at all
    with ProcessPoolExecutor(workers) if planned else contextlib.nullcontext() as pool:
        planned_runs = {(env_id, label, s): pool.submit(run_policy, PLANNERS[label][0], cell, s)
                        for env_id, cell in BENCHMARK_CELLS.items() if env_id in planned
                        for label in chosen for s in planner_seed_list}
        for env_id, cell in BENCHMARK_CELLS.items():
            started = time.perf_counter()
            bounds = [capacity_bound(cell.run_spec(s)).goodput_bound_qps for s in seed_list]
            bound_mean = float(np.mean(bounds))
            entries: dict[str, Any] = {BOUND: summarize(bounds, None, seed_list, bound_mean, env_id, BOUND)}
            for name in POLICIES:
                runs = [run_policy(name, cell, s) for s in seed_list]
                entries[name] = summarize([r["goodput_qps"] for r in runs], [r["slo_attainment"] for r in runs], seed_list,
                                          bound_mean, env_id, name)
            entries[LEARNED]["ratio_to"] = {
                base: ratio_interval(entries[LEARNED]["per_seed"], entries[base]["per_seed"], env_id, LEARNED, base)
                for base in RATIO_BASES}
            for label, (_, base) in PLANNERS.items():
                if env_id in planned and label in chosen:
                    use = planner_seed_list
                    runs = [planned_runs[(env_id, label, s)].result() for s in use]
                    entries[label] = summarize(
                        [r["goodput_qps"] for r in runs], [r["slo_attainment"] for r in runs], use,
                        float(np.mean(bounds[:len(use)])), env_id, label, base=base,
                        base_same_seeds=float(np.mean(entries[base]["per_seed"][:len(use)])),
                        decision_ms_mean=float(np.mean([r["decision_ms_mean"] for r in runs])),
                        changed_share=float(sum(r["changed_decisions"] for r in runs)
                                            / max(1, sum(r["planned_decisions"] for r in runs))))
                elif (carried := carried_planner(previous, env_id, cell, label)) is not None:  # minutes per seed
                    entries[label] = carried
                else:
                    entries[label] = {"measured": False, "note": "not measured on this id (a benchmark-length planner run "
                                                                 "costs minutes per seed)"}
            table["envs"][env_id] = {"cell": {**asdict(cell), "label": cell.label}, "policies": entries}
            best = entries[BEST_HEURISTIC]["goodput_qps"]
            print(f"{env_id}: bound {bound_mean:.4f}, {BEST_HEURISTIC} {best['mean']:.4f} [{best['lo']:.4f}, {best['hi']:.4f}] "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    write_table(table, out)


def write_table(table: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))


def carried_planner(previous: dict[str, Any], env_id: str, cell: Any, label: str) -> dict[str, Any] | None:
    """The planner's entry an earlier table measured on this id's very cell with the same planner,
    marked with the command that measured it and its interval from its own generator; None if it
    has none."""
    env = previous["envs"].get(env_id)
    if env is None or env["cell"] != {**asdict(cell), "label": cell.label}:
        return None
    entry = env["policies"].get(label, {})
    if not entry.get("measured", True) or "base_same_seeds" not in entry:
        return None
    if previous.get("planners", {}).get(label, {}).get("policy") != PLANNERS[label][0]:
        return None
    return {**entry, "goodput_qps": goodput_interval(entry["per_seed"], env_id, label),
            "measured_by": entry.get("measured_by", previous.get("command", ""))}


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
    planned = [(env_id, label, e) for env_id, env in table["envs"].items() for label in table["planners"]
               if (e := env["policies"].get(label)) and e.get("measured", True)]
    if planned:
        lines += ["", "The planners against their base on the same seeds, their mean decision time and the share "
                  "of decisions where the plan overrode the base (" + "; ".join(
                      f"{label} = `{p['policy']}`" for label, p in table["planners"].items()) + "):", "",
                  "| env id | planner | seeds | SLO-goodput | base | base SLO-goodput | ratio | decision ms | overrode |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for env_id, label, e in planned:
            base = e["base_same_seeds"]
            lines.append(f"| {env_id} | {label} | {', '.join(map(str, e['seeds']))} | {e['goodput_qps']['mean']:.4f} | "
                         f"{e['base']} | {base:.4f} | {e['goodput_qps']['mean'] / base:.3f} | "
                         f"{e['decision_ms_mean']:.0f} | {e['changed_share']:.1%} |")
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
    run_script(app)
