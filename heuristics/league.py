"""`agentsched league`: every named policy, each tuned per cell, on the cells that matter.

For each cell (a cluster, trace, load level and shape, length) and each policy with knobs, Optuna
TPE tunes the knobs on *tuning* seeds (objective: mean SLO-goodput; the first trial is the
policy's own knobs, so tuning never makes it worse there); the tuned policy then runs on *test*
seeds that tuning never saw. Policies without knobs run as they are. `--fixed` policies also run
with their shipped knobs, untuned, so a per-cell tuning advantage shows.

Reported per (cell, policy), means over test seeds with percentile-bootstrap intervals
(scipy.stats.bootstrap): SLO-goodput (q/s), SLO attainment, p95 latency, and cost per SLO-met
query (total cost over total met queries, the pair resampled jointly).

Runs are the same `envs.sim.scenario.simulate` calls as `agentsched evaluate` (its `Cell`: load
shapes constant / step / burst) and tuning reuses `heuristics.tune` (search spaces, specs with
knob overrides); jobs go to a process pool or to Ray tasks (`--backend ray`).

Sustained cells: arrivals must span many SLOs for queues to reach steady state. With 60 queries
the paper cluster at 0.12 q/s sees arrivals over ~3 SLOs (scale 3), mixed-16 at 1.6 q/s over
less than one: a burst that drains after the last arrival. The sustained cells are sized so that
arrivals span about 10 SLOs (queries ~ 10 x SLO x rate): 250 queries on the paper cluster at
0.12 q/s (~12 SLOs), 800 on mixed-16 at 0.6 q/s (~10 SLOs).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from concurrent.futures import Future, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from scipy import stats

from envs.sim.cells import Cell
from envs.sim.errors import UserError
from envs.sim.scenario import simulate
from heuristics.bench import PolicyRef, jsonable, make_executor, make_policy
from heuristics.registry import PEERS
from heuristics.tune import _suggest, knob_values, search_space, spec_with

OURS = "least-work+workflow"
SHIPPED_SUFFIX = " (shipped)"
BOOTSTRAP_RESAMPLES = 2000
RUN_METRICS = ("goodput_qps", "slo_attainment", "latency_p95_s", "cost_usd", "n_workflows")


@dataclass(frozen=True)
class LeagueCell:
    name: str
    kind: str  # light, heavy, shifting, unseen, sustained
    cell: Cell

    @property
    def label(self) -> str:
        c = self.cell
        return f"{self.name}: {c.cluster}/{c.trace}/{c.load}@{c.rate_qps:g}/q{c.queries}"


def _cell(name: str, kind: str, cluster: str, rate: float, load: str = "constant", trace: str = "chess_trace1",
          queries: int = 60) -> LeagueCell:
    return LeagueCell(name, kind, Cell(trace=trace, cluster=cluster, rate_qps=rate, load=load, queries=queries))


# the loads of policies/pretrained/least-work+workflow.REPORT.md (light 0.04 / heavy 0.12 q/s on the
# paper cluster, 0.6 / 1.6 q/s on mixed-16), the second shipped trace, the unseen chess_financial,
# and sustained runs (see the module docstring for their length)
DEFAULT_CELLS: tuple[LeagueCell, ...] = (
    _cell("paper-light", "light", "paper", 0.04),
    _cell("paper-heavy", "heavy", "paper", 0.12),
    _cell("paper-step", "shifting", "paper", 0.12, "step"),
    _cell("paper-burst", "shifting", "paper", 0.12, "burst"),
    _cell("paper-trace2", "heavy", "paper", 0.12, trace="chess_trace2"),
    _cell("paper-financial", "unseen", "paper", 0.12, trace="chess_financial"),
    _cell("paper-sustained", "sustained", "paper", 0.12, queries=250),
    _cell("mixed16-light", "light", "mixed-16", 0.6),
    _cell("mixed16-heavy", "heavy", "mixed-16", 1.6),
    _cell("mixed16-step", "shifting", "mixed-16", 1.6, "step"),
    _cell("mixed16-burst", "shifting", "mixed-16", 1.6, "burst"),
    _cell("mixed16-financial", "unseen", "mixed-16", 1.6, trace="chess_financial"),
    _cell("mixed16-sustained", "sustained", "mixed-16", 0.6, queries=800),
    _cell("mixed16-step-sustained", "sustained", "mixed-16", 0.6, "step", queries=800),
)


@dataclass
class LeagueConfig:
    policies: list[str]
    cells: list[LeagueCell]
    tune_seeds: list[int]
    test_seeds: list[int]
    trials: int = 8
    fixed: list[str] = field(default_factory=lambda: [OURS])
    slo_scale: float = 3.0
    workers: int = 1
    backend: str = "process"
    confidence: float = 0.95
    sampler_seed: int = 0


# ---- jobs (run in worker processes or Ray tasks) -----------------------------------------------------

def run_job(policy_ref: PolicyRef, cell: Cell, seed: int) -> dict[str, Any]:
    """One simulation of `agentsched evaluate`'s kind; the metrics the league reports."""
    result, sim = simulate(cell.run_spec(seed), make_policy(policy_ref))
    out = {k: result[k] for k in RUN_METRICS}
    out["n_met"] = sim.met_workflows
    return out


def mean_goodput(policy_ref: PolicyRef, cell: Cell, seeds: Sequence[int]) -> float:
    """Tuning's objective: mean SLO-goodput over the seeds."""
    return float(np.mean([run_job(policy_ref, cell, seed)["goodput_qps"] for seed in seeds]))


def tune_job(policy: PolicyRef, cell: Cell, seeds: Sequence[int], trials: int, sampler_seed: int,
             starts: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """TPE over the policy's search space on the tuning seeds; the best spec and its score. The
    policy's own knobs are the first trial, then those of each spec in `starts` (same sections)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space(policy)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=sampler_seed))
    for start in (make_policy(ref).spec() for ref in (policy, *starts)):
        study.enqueue_trial(knob_values(start, space))

    def objective(trial: Any) -> float:
        spec = spec_with(policy, {k: _suggest(trial, k, s) for k, s in space.items()})
        return mean_goodput(spec, cell, seeds)

    study.optimize(objective, n_trials=trials)
    name = policy if isinstance(policy, str) else str(policy["name"])
    return {"params": dict(study.best_params), "tune_goodput_qps": study.best_value,
            "start_goodput_qps": study.trials[0].value, "spec": spec_with(policy, dict(study.best_params), name=name)}


# ---- statistics ----------------------------------------------------------------------------------

def _interval(data: tuple[np.ndarray, ...], statistic: Callable[..., float], confidence: float,
              seed: int) -> tuple[float, float, float]:
    value = float(statistic(*data))
    if len(data[0]) < 2 or not math.isfinite(value):
        return value, math.nan, math.nan
    if all(np.all(d == d[0]) for d in data):
        return value, value, value
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # resamples without a met query: cost per met = inf
        res = stats.bootstrap(data, statistic, paired=True, vectorized=False, confidence_level=confidence,
                              n_resamples=BOOTSTRAP_RESAMPLES, method="percentile", random_state=seed)
    return value, float(res.confidence_interval.low), float(res.confidence_interval.high)


def _cost_per_met(cost: np.ndarray, met: np.ndarray) -> float:
    return float(cost.sum() / met.sum()) if met.sum() > 0 else math.inf


def summarise(runs: list[dict[str, Any]], confidence: float) -> dict[str, Any]:
    """Means over seeds with bootstrap intervals; cost per SLO-met query pooled over seeds."""
    col = {k: np.array([r[k] for r in runs], dtype=float) for k in ("goodput_qps", "slo_attainment",
                                                                      "latency_p95_s", "cost_usd", "n_met")}
    out: dict[str, Any] = {}
    for i, key in enumerate(("goodput_qps", "slo_attainment", "latency_p95_s")):
        values = col[key][~np.isnan(col[key])]
        mean, lo, hi = _interval((values,), np.mean, confidence, i) if len(values) else (math.nan,) * 3
        out[key] = {"mean": mean, "lo": lo, "hi": hi, "per_seed": col[key].tolist()}
    mean, lo, hi = _interval((col["cost_usd"], col["n_met"]), _cost_per_met, confidence, 3)
    out["cost_per_met_usd"] = {"mean": mean, "lo": lo, "hi": hi}
    return out


def ratio_interval(num: Sequence[float], den: Sequence[float], confidence: float) -> dict[str, float]:
    """Ratio of mean SLO-goodputs with a paired bootstrap interval (the same seeds resampled)."""
    a, b = np.asarray(num, float), np.asarray(den, float)

    def ratio(x: np.ndarray, y: np.ndarray) -> float:
        return float(x.mean() / y.mean()) if y.mean() > 0 else math.inf

    mean, lo, hi = _interval((a, b), ratio, confidence, 7)
    return {"mean": mean, "lo": lo, "hi": hi}


# ---- the league -------------------------------------------------------------------------------------

def entries(cfg: LeagueConfig) -> list[tuple[str, str, bool]]:
    """(label, policy name, tune it) for every policy in the league."""
    out = [(p, p, bool(search_space(p))) for p in cfg.policies]
    out += [(p + SHIPPED_SUFFIX, p, False) for p in cfg.fixed if p in cfg.policies and search_space(p)]
    return out


def run_league(cfg: LeagueConfig, progress: Callable[[str], None] | None = None,
               on_total: Callable[[int], None] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    cells = [c.cell if c.cell.slo_scale == cfg.slo_scale else Cell(**{**asdict(c.cell), "slo_scale": cfg.slo_scale})
             for c in cfg.cells]
    todo = entries(cfg)
    n_tune = sum(1 for _, _, tune in todo if tune) * len(cells)
    if on_total:
        on_total(n_tune + len(todo) * len(cells) * len(cfg.test_seeds))
    tuned: dict[tuple[int, str], dict[str, Any]] = {}
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with make_executor(cfg.backend, cfg.workers) as pool:
        pending: dict[Future, tuple[str, int, str, int]] = {}

        def submit_tests(ci: int, label: str, ref: PolicyRef) -> None:
            for seed in cfg.test_seeds:
                pending[pool.submit(run_job, ref, cells[ci], seed)] = ("run", ci, label, seed)

        for ci, cell in enumerate(cells):
            for label, policy, tune in todo:
                if tune:
                    fut = pool.submit(tune_job, policy, cell, cfg.tune_seeds, cfg.trials, cfg.sampler_seed)
                    pending[fut] = ("tune", ci, label, -1)
                else:
                    submit_tests(ci, label, policy)
        while pending:
            fut = next(as_completed(list(pending)))
            kind, ci, label, seed = pending.pop(fut)
            result = fut.result()
            if kind == "tune":
                tuned[(ci, label)] = result
                submit_tests(ci, label, result["spec"])
            else:
                runs.setdefault((ci, label), []).append({"seed": seed, **result})
            if progress:
                progress(f"{cfg.cells[ci].name} {label}")
    out_cells = []
    for ci, lc in enumerate(cfg.cells):
        policies: dict[str, Any] = {}
        for label, policy, tune in todo:
            rows = sorted(runs[(ci, label)], key=lambda r: r["seed"])
            entry = {"policy": policy, "tuned": tune, **summarise(rows, cfg.confidence)}
            if tune:
                t = tuned[(ci, label)]
                entry["knobs"] = t["params"]
                entry["tune_goodput_qps"] = {"start": t["start_goodput_qps"], "tuned": t["tune_goodput_qps"]}
            policies[label] = entry
        ranking = sorted(policies, key=lambda k: -policies[k]["goodput_qps"]["mean"])
        versus: dict[str, Any] = {}
        rival_sets = (("ours_vs_best_other", [k for k in ranking if policies[k]["policy"] != OURS]),
                      ("ours_vs_best_peer", [k for k in ranking if policies[k]["policy"] in PEERS]))
        for key, rivals in rival_sets:
            if OURS in policies and rivals:
                versus[key] = {"best": rivals[0], "goodput_ratio": ratio_interval(
                    policies[OURS]["goodput_qps"]["per_seed"], policies[rivals[0]]["goodput_qps"]["per_seed"],
                    cfg.confidence)}
        out_cells.append({"name": lc.name, "kind": lc.kind, "label": lc.label, "cell": asdict(cells[ci]),
                          "ranking": ranking, "policies": policies, **versus})
    return {"config": {"policies": cfg.policies, "fixed": cfg.fixed, "tune_seeds": cfg.tune_seeds,
                       "test_seeds": cfg.test_seeds, "trials": cfg.trials, "slo_scale": cfg.slo_scale,
                       "workers": cfg.workers, "backend": cfg.backend, "confidence": cfg.confidence,
                       "objective": "mean SLO-goodput over the tuning seeds"},
            "cells": out_cells, "wall_s": time.perf_counter() - started}


# ---- outputs ----------------------------------------------------------------------------------------

def _f(m: dict[str, float], digits: int) -> str:
    def one(x: float) -> str:
        return "inf" if math.isinf(x) else ("-" if math.isnan(x) else f"{x:.{digits}f}")

    if math.isnan(m["lo"]):
        return one(m["mean"])
    return f"{one(m['mean'])} [{one(m['lo'])}, {one(m['hi'])}]"


def markdown(results: dict[str, Any], top: int | None = None) -> str:
    """The league table: per cell, policies by SLO-goodput (`top`: only the first n, plus ours)."""
    cfg = results["config"]
    conf = int(cfg["confidence"] * 100)
    lines = [f"Test seeds {_seeds(cfg['test_seeds'])}; knobs tuned per cell on seeds {_seeds(cfg['tune_seeds'])} "
             f"({cfg['trials']} TPE trials, objective SLO-goodput); SLO scale {cfg['slo_scale']:g}; means with "
             f"{conf}% bootstrap intervals. `{SHIPPED_SUFFIX.strip()}` = one setting for every cell, untuned.", "",
             "| cell | # | policy | SLO-goodput (q/s) | SLO attainment | p95 latency (s) | $ per SLO-met query |",
             "|---|---|---|---|---|---|---|"]
    for cell in results["cells"]:
        shown = cell["ranking"] if top is None else [
            k for i, k in enumerate(cell["ranking"]) if i < top or cell["policies"][k]["policy"] == OURS]
        for label in shown:
            p = cell["policies"][label]
            rank = cell["ranking"].index(label) + 1
            name = f"**{label}**" if p["policy"] == OURS else label
            lines.append(f"| {cell['name']} | {rank} | {name} | {_f(p['goodput_qps'], 4)} | "
                         f"{_f(p['slo_attainment'], 3)} | {_f(p['latency_p95_s'], 0)} | {_f(p['cost_per_met_usd'], 3)} |")
    lines += ["", f"{OURS} (tuned per cell) over the cell's best peer and best other policy, SLO-goodput "
              f"(paired bootstrap):", "", "| cell | best peer | ratio | best other | ratio |", "|---|---|---|---|---|"]
    for cell in results["cells"]:
        peer, other = cell.get("ours_vs_best_peer"), cell.get("ours_vs_best_other")
        if peer and other:
            lines.append(f"| {cell['label']} | {peer['best']} | {_f(peer['goodput_ratio'], 2)} | {other['best']} | "
                         f"{_f(other['goodput_ratio'], 2)} |")
    return "\n".join(lines) + "\n"


def summary(results: dict[str, Any]) -> str:
    """One row per cell: SLO-goodput of ours (tuned and shipped), HexGen and every peer, and the
    cell's best other policy; full intervals, attainment, p95 and cost are in `markdown`."""
    first = results["cells"][0]["policies"]
    cols = [k for k in (OURS, OURS + SHIPPED_SUFFIX, "hexgen", *PEERS) if k in first]
    lines = ["| cell | " + " | ".join(cols) + " | ours / best peer | best other (ours excluded) |",
             "|---|" + "---|" * (len(cols) + 2)]
    for cell in results["cells"]:
        p = cell["policies"]
        row = [f"{p[k]['goodput_qps']['mean']:.4f}" if k in p else "-" for k in cols]
        peer, other = cell.get("ours_vs_best_peer"), cell.get("ours_vs_best_other")
        lines.append(f"| {cell['name']} | " + " | ".join(row) + " | "
                     + (f"{_f(peer['goodput_ratio'], 2)} ({peer['best']})" if peer else "-") + " | "
                     + (f"{other['best']} {p[other['best']]['goodput_qps']['mean']:.4f}" if other else "-") + " |")
    return "\n".join(lines) + "\n"


def _seeds(seeds: Sequence[int]) -> str:
    s = list(seeds)
    return f"{s[0]}-{s[-1]}" if s == list(range(s[0], s[0] + len(s))) and len(s) > 2 else ",".join(map(str, s))


def plot(results: dict[str, Any], path: Path) -> Path:
    """One panel per cell: policies sorted by SLO-goodput, bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    cols = min(4, len(cells))
    rows = math.ceil(len(cells) / cols)
    n = max(len(c["ranking"]) for c in cells)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.22 * n * rows + 1.2 * rows), squeeze=False)
    for ax, cell in zip(axes.flat, cells):
        labels = cell["ranking"][::-1]  # best at the top
        ms = [cell["policies"][k]["goodput_qps"] for k in labels]
        means = np.array([m["mean"] for m in ms])
        err = np.nan_to_num(np.array([[m["mean"] - m["lo"] for m in ms], [m["hi"] - m["mean"] for m in ms]]))
        colors = ["tab:red" if cell["policies"][k]["policy"] == OURS else
                  ("tab:blue" if cell["policies"][k]["policy"] in PEERS else "tab:gray") for k in labels]
        ax.barh(range(len(labels)), means, xerr=np.clip(err, 0, None), color=colors, capsize=2)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_title(cell["label"], fontsize=7)
        ax.set_xlabel("SLO-goodput (q/s)", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "league.json", out / "league.md", out / "league.png"]
    paths[0].write_text(json.dumps(jsonable(results), indent=2))
    paths[1].write_text(f"# League\n\nSLO-goodput (q/s), test-seed means:\n\n{summary(results)}\n{markdown(results)}")
    plot(results, paths[2])
    return paths


def select_cells(names: str | None) -> list[LeagueCell]:
    if names is None:
        return list(DEFAULT_CELLS)
    known = {c.name: c for c in DEFAULT_CELLS}
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in known:
            raise UserError(f"--cells: unknown cell {name!r} (cells: {', '.join(known)})")
        out.append(known[name])
    if not out:
        raise UserError("--cells: give at least one cell (e.g. --cells paper-heavy,mixed16-heavy)")
    return out
