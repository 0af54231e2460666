"""`agentsched bench`, `agentsched tune` and `agentsched policies`.

Heavy imports stay inside the commands so `agentsched --help` is instant. Every user mistake is
a `UserError`/`PolicyError`: one line on stderr naming the flag and the fix, exit code 2.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional

import typer

from envs.sim.errors import UserError
from heuristics.bench import DEFAULT_POLICIES


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
    app.command("tune")(tune_command)
    app.command("policies")(policies_command)
    app.command("league")(league_command)


# ---- flag parsing --------------------------------------------------------------------------------

def parse_floats(flag: str, text: str | None, example: str) -> list[float] | None:
    """A comma-separated list of positive numbers, or None when the flag was not given."""
    if text is None:
        return None
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--{flag}: {part!r} is not a number (e.g. --{flag} {example})") from None
        if not value > 0 or math.isinf(value):
            raise UserError(f"--{flag}: values must be positive numbers, got {part} (e.g. --{flag} {example})")
        values.append(value)
    if not values:
        raise UserError(f"--{flag}: give at least one value (e.g. --{flag} {example})")
    return sorted(set(values))


def parse_ints(flag: str, text: str, example: str) -> list[int]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise UserError(f"--{flag}: {part!r} is not an integer (e.g. --{flag} {example})") from None
    if not values:
        raise UserError(f"--{flag}: give at least one integer (e.g. --{flag} {example})")
    return list(dict.fromkeys(values))


def check_positive(flag: str, value: float | None) -> None:
    if value is not None and (not value > 0 or math.isinf(value)):
        raise UserError(f"--{flag}: must be a positive number, got {value}")


def check_backend(backend: str) -> None:
    from heuristics.bench import BACKENDS

    if backend not in BACKENDS:
        raise UserError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)} (e.g. --backend ray)")


def validate_scenario(trace: str, cluster: str, queries: int | None) -> None:
    """Fail fast, in the main process, on a bad trace/cluster/queries (one-line errors)."""
    from envs.sim.config import load_cluster
    from envs.sim.workload import load_trace

    load_trace(trace)
    load_cluster(cluster)
    if queries is not None and queries <= 0:
        raise UserError(f"--queries: must be a positive integer, got {queries}")


def _console() -> Any:
    """A rich console that stays wide enough for the tables when output is piped (CI, make)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=150)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


# ---- bench ---------------------------------------------------------------------------------------

def bench_command(
    trace: str = typer.Option("chess_trace1", help="CHESS trace file, or a shipped trace name"),
    cluster: str = typer.Option("paper", help="cluster name (paper, mixed-16, llama8b) or YAML file"),
    policies: str = typer.Option(",".join(DEFAULT_POLICIES),
                                 help="comma-separated policy names or policy files; rr is always added (the baseline)"),
    rates: Optional[str] = typer.Option(None, help="arrival rates, q/s, comma-separated; default: 0.05,0.1,0.15,0.25,0.4 x the cluster's estimated capacity"),
    slo_scales: str = typer.Option("1.5,2,3,4,6", help="SLO scales, comma-separated"),
    seeds: str = typer.Option("0,1", help="seeds, comma-separated; attainment is pooled over them"),
    queries: Optional[int] = typer.Option(None, help="queries per run (default: the whole trace; more draws from a fitted generator)"),
    ratio_rate: Optional[float] = typer.Option(None, help="rate (q/s) of the deadline ratio; default 0.1 x estimated capacity"),
    ratio_scale: float = typer.Option(3.0, help="SLO scale of the goodput ratio"),
    ratios: bool = typer.Option(True, "--ratios/--no-ratios", help="search the thresholds behind the headline ratios"),
    workers: Optional[int] = typer.Option(None, help="worker processes (default: all cores)"),
    backend: str = typer.Option("process", help="process (local worker pool) or ray (Ray tasks; RAY_ADDRESS to use a cluster)"),
    out: Path = typer.Option(Path("runs/bench"), help="output directory: results.json, CSVs and PNG plots"),
) -> None:
    """Benchmark policies on a grid of rates x SLO scales x seeds; the paper's headline ratios vs rr."""
    import os

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from heuristics.bench import (DEFAULT_LOADS, DEFAULT_RATIO_LOAD, BenchConfig, Scenario, capacity_qps_estimate,
                                  make_policy, run_bench)
    from heuristics.plots import make_plots

    console = _console()
    validate_scenario(trace, cluster, queries)
    refs = [p.strip() for p in policies.split(",") if p.strip()]
    if not refs:
        raise UserError("--policies: give at least one policy (e.g. --policies rr,hexgen)")
    if "rr" not in refs:
        refs.insert(0, "rr")
    for ref in refs:
        make_policy(ref)  # PolicyError: one line
    check_positive("ratio-rate", ratio_rate)
    check_positive("ratio-scale", ratio_scale)
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    check_backend(backend)
    capacity = capacity_qps_estimate(trace, cluster)
    rate_list = parse_floats("rates", rates, "0.02,0.05") or [round(capacity * f, 4) for f in DEFAULT_LOADS]
    scale_list = parse_floats("slo-scales", slo_scales, "1.5,3,6")
    seed_list = parse_ints("seeds", seeds, "0,1")
    ratio_rate_qps = ratio_rate if ratio_rate is not None else round(capacity * DEFAULT_RATIO_LOAD, 4)
    cfg = BenchConfig(Scenario(trace, cluster, queries), refs, rate_list, scale_list, seed_list, ratio_rate_qps,
                      ratio_scale, workers=workers or os.cpu_count() or 1, ratios=ratios, backend=backend)
    console.print(f"[bold]bench[/] {trace} on {cluster}: {len(refs)} policies x {len(rate_list)} rates x "
                  f"{len(scale_list)} SLO scales x {len(seed_list)} seeds, {cfg.workers} workers; estimated capacity "
                  f"~{capacity:.3g} q/s (prefill-bound), rates {', '.join(f'{r:g}' for r in rate_list)} q/s")
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("simulating", total=None)
        results = run_bench(cfg, progress=lambda label, n: bar.update(task, advance=n, description=f"simulating ({label})"),
                            on_total=lambda n: bar.update(task, total=n))
        bar.update(task, description="simulating")
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, out)
    results["plots"] = [str(p) for p in plots]
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    _write_csv(out / "points.csv", results["points"])
    _write_csv(out / "summary.csv", results["summary"])
    print_bench_table(console, results)
    for warning in results.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"wrote {out / 'results.json'}, points.csv, summary.csv ({results['wall_s']:.1f} s)")
    console.print("plots: " + ", ".join(str(p) for p in plots))


def print_bench_table(console: Any, results: dict[str, Any]) -> None:
    from rich.table import Table

    from heuristics.bench import nearest

    cfg = results["config"]
    rate = nearest(cfg["rates_qps"], cfg["ratio_rate_qps"])
    scale = nearest(cfg["slo_scales"], cfg["ratio_slo_scale"])
    at = {r["policy"]: r for r in results["summary"] if r["rate_qps"] == rate and r["slo_scale"] == scale}
    top_rate = max(cfg["rates_qps"])
    at_top = {r["policy"]: r for r in results["summary"] if r["rate_qps"] == top_rate and r["slo_scale"] == scale}
    table = Table(title=f"{cfg['trace']} on {cfg['cluster']} (target {cfg['target_attainment']:.0%} attainment)")
    table.add_column("policy", no_wrap=True)
    table.add_column(f"attain @{rate:g} q/s x{scale:g}", justify="right")
    table.add_column(f"attain @{top_rate:g} q/s x{scale:g}", justify="right")
    table.add_column(f"p95 s @{top_rate:g} q/s", justify="right")
    if results.get("ratios_vs_rr"):
        table.add_column(f"min SLO scale @{cfg['ratio_rate_qps']:g} q/s", justify="right")
        table.add_column(f"max rate @x{cfg['ratio_slo_scale']:g}", justify="right")
        table.add_column("deadline ratio", justify="right")
        table.add_column("goodput ratio", justify="right")
    for policy in cfg["policies"]:
        row = [policy, _fmt(at.get(policy, {}).get("slo_attainment")), _fmt(at_top.get(policy, {}).get("slo_attainment")),
               _fmt(at_top.get(policy, {}).get("latency_p95_s"), 4)]
        if results.get("ratios_vs_rr"):
            t = results["thresholds"].get(policy, {})
            r = results["ratios_vs_rr"].get(policy, {})
            row += [_fmt(t.get("min_slo_scale")), _fmt(t.get("max_rate_qps")), _fmt(r.get("deadline_ratio")),
                    _fmt(r.get("goodput_ratio"))]
        table.add_row(*row)
    console.print(table)


def _jsonable(value: Any) -> Any:
    """JSON without NaN/Infinity literals: non-finite floats become strings ("inf", "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---- tune ----------------------------------------------------------------------------------------

def tune_command(
    policy: str = typer.Option("hexgen", help="policy to tune: a name or policy file (its knobs with a search space are tuned)"),
    trace: str = typer.Option("chess_trace1", help="CHESS trace file, or a shipped trace name"),
    cluster: str = typer.Option("paper", help="cluster name or YAML file"),
    rate: Optional[float] = typer.Option(None, help="arrival rate, q/s (default 0.4 x the cluster's estimated capacity, where tuning has something to gain)"),
    slo_scale: float = typer.Option(3.0, help="SLO scale"),
    trials: int = typer.Option(30, help="Optuna trials in total (a resumed study only runs the missing ones)"),
    seeds: str = typer.Option("0,1,2", help="tuning seeds (the objective)"),
    test_seeds: str = typer.Option("100,101,102", help="held-out seeds for the report (never seen by tuning)"),
    queries: Optional[int] = typer.Option(None, help="queries per run (default: the whole trace)"),
    grid: bool = typer.Option(False, "--grid", help="the paper's sweep: alpha in {0, 0.1, ..., 0.5} at --rates"),
    rates: Optional[str] = typer.Option(None, help="--grid rates, q/s (default 0.25,0.5 x estimated capacity: the paper's 0.5 and 1.0 q/s as relative loads)"),
    out: Optional[Path] = typer.Option(None, help="tuned policy file (default runs/tune/<policy>-tuned.yaml); the Optuna SQLite study sits next to it"),
    workers: Optional[int] = typer.Option(None, help="worker processes (default: all cores)"),
    sampler_seed: int = typer.Option(0, help="seed of the TPE sampler"),
) -> None:
    """Tune a policy's knobs in simulation (Optuna TPE, or the paper's alpha grid); writes a policy file."""
    import os

    from rich.console import Console

    from heuristics.bench import capacity_qps_estimate, make_policy
    from heuristics.tune import TuneConfig, run_grid, run_tpe

    console = _console()
    validate_scenario(trace, cluster, queries)
    make_policy(policy)
    check_positive("rate", rate)
    check_positive("slo-scale", slo_scale)
    if trials < 1:
        raise UserError(f"--trials: must be >= 1, got {trials}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    tune_seeds = parse_ints("seeds", seeds, "0,1,2")
    held_out = parse_ints("test-seeds", test_seeds, "100,101")
    overlap = sorted(set(tune_seeds) & set(held_out))
    if overlap:
        raise UserError(f"--test-seeds: seed {overlap[0]} is also a tuning seed; test seeds must be unseen (e.g. --test-seeds 100,101)")
    capacity = capacity_qps_estimate(trace, cluster)
    rate_qps = rate if rate is not None else round(0.4 * capacity, 4)
    grid_rates = parse_floats("rates", rates, "0.05,0.09") or [round(0.25 * capacity, 4), round(0.5 * capacity, 4)]
    stem = Path(policy).stem if Path(policy).suffix in (".yaml", ".yml", ".json") else policy
    out_path = out or Path("runs/tune") / f"{stem}-{'grid' if grid else 'tuned'}.yaml"
    if out_path.suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"--out: {out_path} must end in .yaml, .yml or .json (a policy file)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cfg = TuneConfig(policy=policy, trace=trace, cluster=cluster, rate_qps=rate_qps, slo_scale=slo_scale,
                     trials=trials, seeds=tune_seeds, test_seeds=held_out, queries=queries, out=out_path,
                     workers=workers or os.cpu_count() or 1, sampler_seed=sampler_seed, grid_rates=grid_rates)
    report = run_grid(cfg, console) if grid else run_tpe(cfg, console)
    console.print(f"wrote {out_path} (load it with --policy {out_path}); study: {report['storage']}")


# ---- league --------------------------------------------------------------------------------------

def league_command(
    policies: Optional[str] = typer.Option(None, help="comma-separated policy names (default: every named policy)"),
    cells: Optional[str] = typer.Option(None, help="comma-separated cell names (default: all; see heuristics/league.py)"),
    trials: int = typer.Option(8, help="TPE trials per (cell, policy) with knobs (the first is the policy's own knobs)"),
    tune_seeds: str = typer.Option("150000-150002", help="tuning seeds: 'a-b' or 'a,b,c'"),
    test_seeds: str = typer.Option("200000-200009", help="test seeds (disjoint from the tuning seeds)"),
    fixed: str = typer.Option("least-work+workflow", help="policies also run with their shipped knobs, untuned ('' for none)"),
    slo_scale: float = typer.Option(3.0, help="SLO scale"),
    workers: Optional[int] = typer.Option(None, help="worker processes, or local Ray CPUs (default: all cores)"),
    backend: str = typer.Option("process", help="process (local worker pool) or ray (Ray tasks; RAY_ADDRESS to use a cluster)"),
    out: Path = typer.Option(Path("runs/league"), help="output directory: league.json, league.md, league.png"),
) -> None:
    """Every named policy, tuned per cell on tuning seeds, on the cells that matter; test seeds with bootstrap CIs."""
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from heuristics import registry
    from heuristics.league import LeagueConfig, run_league, select_cells, summary, write
    from training.evaluate import parse_seeds

    console = _console()
    names = [p.strip() for p in policies.split(",") if p.strip()] if policies is not None else list(registry.NAMED)
    if not names:
        raise UserError("--policies: give at least one policy (e.g. --policies least-work+workflow,autellix-atlas)")
    for name in names:
        if name not in registry.NAMED:
            raise UserError(f"--policies: unknown policy {name!r} (named policies: {', '.join(registry.NAMED)})")
    fixed_names = [p.strip() for p in fixed.split(",") if p.strip()]
    for name in fixed_names:
        if name not in names:
            raise UserError(f"--fixed: {name!r} is not in --policies")
    if trials < 1:
        raise UserError(f"--trials: must be >= 1, got {trials}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    check_positive("slo-scale", slo_scale)
    check_backend(backend)
    tune_list, test_list = parse_seeds(tune_seeds), parse_seeds(test_seeds)
    overlap = sorted(set(tune_list) & set(test_list))
    if overlap:
        raise UserError(f"--test-seeds: seed {overlap[0]} is also a tuning seed; test seeds must be unseen")
    cfg = LeagueConfig(policies=names, cells=select_cells(cells), tune_seeds=tune_list, test_seeds=test_list,
                       trials=trials, fixed=fixed_names, slo_scale=slo_scale, workers=workers or os.cpu_count() or 1,
                       backend=backend)
    console.print(f"[bold]league[/] {len(names)} policies x {len(cfg.cells)} cells, {trials} trials on seeds "
                  f"{tune_seeds}, test seeds {test_seeds}, {cfg.workers} workers ({backend})")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("league", total=None)
        results = run_league(cfg, progress=lambda label: bar.update(task, advance=1, description=label),
                             on_total=lambda n: bar.update(task, total=n))
    paths = write(results, out)
    console.print("SLO-goodput (q/s), test-seed means (intervals, attainment, p95 and cost in league.md):")
    console.print(summary(results), markup=False)
    console.print(f"wrote {', '.join(str(p) for p in paths)} ({results['wall_s']:.0f} s)")


# ---- policies ------------------------------------------------------------------------------------

def policies_command() -> None:
    """List the named policies (usable wherever --policy takes a name) and their knobs."""
    from rich.console import Console
    from rich.table import Table

    from heuristics import registry
    from policies import load_policy

    table = Table(title="named policies (or give a policy file: {base: hexgen, dispatch: {alpha: 0.3}})")
    for col in ("name", "dispatch", "local", "knobs", "what"):
        table.add_column(col)
    for name, entry in registry.NAMED.items():
        knobs = load_policy(name).knobs()
        text = "; ".join(f"{k}={v}" for part in knobs.values() for k, v in part.items())
        table.add_row(name, entry.dispatch, entry.local, text, entry.about)
    _console().print(table)
