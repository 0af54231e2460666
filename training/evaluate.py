"""`agentsched evaluate`: a policy against baselines on held-out seeds, with bootstrap intervals.

Every (cell, policy, seed) is one `envs.sim.scenario.simulate` run, exactly what `agentsched
simulate` and `agentsched bench` run, so the numbers are comparable. A cell is a workload, a
cluster, a load level and shape, and an SLO scale. For each cell and policy we report the mean over
seeds and a BCa bootstrap interval of the mean (`scipy.stats.bootstrap`); for every policy and every
baseline, the ratio of mean SLO-goodput and of mean SLO attainment, with a *paired* BCa interval
(seeds are resampled jointly, so the common noise of a hard seed cancels). Every policy's mean
SLO-goodput is also given as a share of the cell's capacity bound (`envs.sim.capacity`: an upper
bound on what any policy could reach, averaged over the same seeds).

The cells and their load shapes (constant, step, burst) are `envs.sim.cells.Cell`.
"""

from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

from envs.sim.capacity import capacity_bound
from envs.sim.cells import Cell
from envs.sim.errors import UserError
from envs.sim.scenario import simulate
from heuristics.bench import RayExecutor
from policies.loader import load_policy, policy_label

METRICS = ("goodput_qps", "slo_attainment", "latency_p95_s", "latency_mean_s", "slo_goodput_per_usd")
RATIO_METRICS = ("goodput_qps", "slo_attainment")
BOOTSTRAP_RESAMPLES = 2000


def bootstrap_mean(values: np.ndarray, confidence: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean over seeds and its BCa bootstrap interval (`scipy.stats.bootstrap`); NaN seeds dropped."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    return (mean, *_bca_interval((values,), _mean, mean, confidence, rng))


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, confidence: float,
                    rng: np.random.Generator) -> tuple[float, float, float]:
    """Ratio of means with a paired BCa bootstrap interval: the same seeds are resampled for both
    (`paired=True`), so the noise a hard seed puts on both policies cancels."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    ok = ~(np.isnan(num) | np.isnan(den))
    num, den = num[ok], den[ok]
    if not len(num) or den.mean() <= 0:
        return math.nan, math.nan, math.nan
    ratio = float(num.mean() / den.mean())
    return (ratio, *_bca_interval((num, den), _ratio_of_means, ratio, confidence, rng))


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return values.mean(axis=axis)


def _ratio_of_means(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return num.mean(axis=axis) / den.mean(axis=axis)


def _bca_interval(data: tuple[np.ndarray, ...], statistic: Any, point: float, confidence: float,
                  rng: np.random.Generator) -> tuple[float, float]:
    """`scipy.stats.bootstrap(method="BCa")`; with one seed, or when every resample gives the same
    value (identical seeds, an exact gain on every seed), the interval is the point itself, as the
    BCa acceleration is undefined there."""
    if len(data[0]) < 2:
        return point, point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (stats.DegenerateDataWarning, RuntimeWarning))
        result = stats.bootstrap(data, statistic, paired=len(data) > 1, vectorized=True, confidence_level=confidence,
                                 n_resamples=BOOTSTRAP_RESAMPLES, method="BCa", rng=rng)
    lo, hi = (float(x) for x in result.confidence_interval)
    if not (math.isfinite(lo) and math.isfinite(hi)) and np.allclose(result.bootstrap_distribution, point):
        return point, point
    return lo, hi


_POLICY_CACHE: dict[str, Any] = {}


def load_cached_policy(name: str) -> Any:
    """`load_policy`, once per process (workers run many seeds of the same policy)."""

    if name not in _POLICY_CACHE:
        _POLICY_CACHE[name] = load_policy(name)
    return _POLICY_CACHE[name]


def _run_one(args: tuple[str, Cell, int]) -> dict[str, Any]:
    name, cell, seed = args
    result, _ = simulate(cell.run_spec(seed), load_cached_policy(name))
    return {k: result.get(k) for k in METRICS}


def evaluate(policy: str, baselines: Sequence[str], cells: Sequence[Cell], seeds: Sequence[int],
             confidence: float = 0.95, out_dir: str | Path | None = None, workers: int = 1,
             backend: str = "process") -> dict[str, Any]:
    """Run every policy on every cell and seed; returns (and writes) the results dict."""
    if not seeds:
        raise UserError("--seeds: give at least one seed")
    names = [policy] + [b for b in baselines if b != policy]
    labels: dict[str, str] = {}
    for n in names:
        load_cached_policy(n)  # fail early, one line, before any long run
        label = policy_label(n)
        while label in labels.values():
            label += "'"
        labels[n] = label
    jobs = [(n, c, s) for c in cells for n in names for s in seeds]
    if backend == "ray":  # Ray tasks (RAY_ADDRESS: an existing cluster), the same runs as the pool
        with RayExecutor(workers) as pool:
            outcomes = list(pool.map(_run_one, jobs))
    elif workers > 1:
        # spawn, not fork: the parent has torch (and its thread pools) loaded, which forked
        # children can deadlock on
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = list(pool.map(_run_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        outcomes = [_run_one(j) for j in jobs]
    per: dict[tuple[str, Cell], dict[str, list[float]]] = {}
    for (n, c, _seed), out in zip(jobs, outcomes):
        bucket = per.setdefault((n, c), {m: [] for m in METRICS})
        for m in METRICS:
            v = out.get(m)
            bucket[m].append(math.nan if v is None else float(v))
    rng = np.random.default_rng(0)
    result_cells = []
    for c in cells:
        pol: dict[str, Any] = {}
        for n in names:
            metrics = {}
            for m in METRICS:
                vals = np.array(per[(n, c)][m])
                mean, lo, hi = bootstrap_mean(vals, confidence, rng)
                metrics[m] = {"mean": mean, "lo": lo, "hi": hi, "per_seed": vals.tolist()}
            pol[labels[n]] = {"source": n, "metrics": metrics}
        ratios: dict[str, Any] = {}
        for n in names:
            ratios[labels[n]] = {}
            for b in baselines:
                if b == n:
                    continue
                ratios[labels[n]][labels[b]] = {
                    m: dict(zip(("mean", "lo", "hi"), bootstrap_ratio(np.array(per[(n, c)][m]), np.array(per[(b, c)][m]),
                                                                       confidence, rng)))
                    for m in RATIO_METRICS}
        # the capacity bound of each seed's run (envs/sim/capacity.py): an upper bound on SLO-goodput
        bound = [capacity_bound(c.run_spec(s)).goodput_bound_qps for s in seeds]
        for p in pol.values():
            p["goodput_share_of_bound"] = _share_of_bound(p["metrics"]["goodput_qps"]["mean"], bound)
        result_cells.append({"cell": {**asdict(c), "label": c.label}, "policies": pol, "ratios": ratios,
                             "goodput_bound_qps": {"mean": float(np.mean(bound)), "per_seed": bound}})
    results = {"policy": labels[policy], "baselines": [labels[b] for b in baselines], "seeds": list(seeds),
               "confidence": confidence, "bootstrap_resamples": BOOTSTRAP_RESAMPLES, "cells": result_cells}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "table.md").write_text(markdown_table(results))
        plot(results, out)
    return results


def _share_of_bound(goodput_qps: float, bound_qps: Sequence[float]) -> float:
    """Mean SLO-goodput over the mean capacity bound of the same seeds."""
    mean_bound = float(np.mean(bound_qps))
    return goodput_qps / mean_bound if mean_bound > 0 else math.nan


def _fmt(m: dict[str, float], digits: int = 4) -> str:
    return f"{m['mean']:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"


def markdown_table(results: dict[str, Any]) -> str:
    conf = int(results["confidence"] * 100)
    main = results["policy"]
    lines = [f"Means over {len(results['seeds'])} seeds with {conf}% bootstrap intervals; ratios are "
             f"{main}'s mean over the baseline's (paired bootstrap).", "",
             "| cell | policy | SLO-goodput (q/s) | share of bound | SLO attainment | p95 latency (s) | goodput ratio | attainment ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for cell in results["cells"]:
        for label, p in cell["policies"].items():
            m = p["metrics"]
            if label == main:
                g = a = "(policy)"
            else:
                r = cell["ratios"][main].get(label, {})
                g = _fmt(r["goodput_qps"], 2) if r else "-"
                a = _fmt(r["slo_attainment"], 2) if r else "-"
            lines.append(f"| {cell['cell']['label']} | {label} | {_fmt(m['goodput_qps'])} | "
                         f"{p['goodput_share_of_bound']:.2f} | {_fmt(m['slo_attainment'], 3)} | "
                         f"{_fmt(m['latency_p95_s'], 0)} | {g} | {a} |")
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    main = results["policy"]
    table = Table(title=f"{main} vs baselines ({int(results['confidence'] * 100)}% bootstrap CI over "
                        f"{len(results['seeds'])} seeds)")
    for col in ("cell", "policy", "SLO-goodput q/s", "share of bound", "attainment", "p95 s", f"{main} / policy goodput",
                f"{main} / policy attainment"):
        table.add_column(col)
    for cell in results["cells"]:
        for label, p in cell["policies"].items():
            m = p["metrics"]
            r = cell["ratios"][main].get(label) if label != main else None
            table.add_row(cell["cell"]["label"], label, _fmt(m["goodput_qps"]), f"{p['goodput_share_of_bound']:.2f}",
                          _fmt(m["slo_attainment"], 3),
                          _fmt(m["latency_p95_s"], 0), _fmt(r["goodput_qps"], 2) if r else "",
                          _fmt(r["slo_attainment"], 2) if r else "")
        table.add_section()
    Console(width=200).print(table)


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    for metric, title in (("goodput_qps", "SLO-goodput (q/s)"), ("slo_attainment", "SLO attainment")):
        fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 3.2), squeeze=False)
        for ax, cell in zip(axes[0], cells):
            labels = list(cell["policies"])
            ms = [cell["policies"][lbl]["metrics"][metric] for lbl in labels]
            means = [m["mean"] for m in ms]
            err = np.array([[m["mean"] - m["lo"] for m in ms], [m["hi"] - m["mean"] for m in ms]])
            colors = ["tab:red" if lbl == results["policy"] else "tab:gray" for lbl in labels]
            ax.bar(range(len(labels)), means, yerr=np.nan_to_num(err), color=colors, capsize=3)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
            ax.set_title(cell["cell"]["label"], fontsize=8)
        axes[0][0].set_ylabel(title)
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=110)
        plt.close(fig)
