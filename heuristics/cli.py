"""`agentsched bench`, `agentsched tune`, `agentsched plan` and `agentsched policies`.

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

from agentsched.options import (
    LIST_METAVAR,
    Backend,
    FloatList,
    IntList,
    OnOff,
    TextList,
    backend_option,
    parse_float_list,
    parse_int_list,
    parse_text_list,
    positive_float,
    prefix_cache_option,
    writable_dir,
    writable_file,
)
from envs.cli import check_run
from envs.sim.errors import UserError
from envs.sim.scenario import RunSpec
from heuristics.bench import DEFAULT_POLICIES, jsonable


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
    app.command("tune")(tune_command)
    app.command("plan")(plan_command)
    app.command("policies")(policies_command)
    app.command("league")(league_command)


# ---- validation ----------------------------------------------------------------------------------

def check_scenario(trace: str, cluster: str, queries: int | None, seeds: list[int]) -> None:
    """Fail fast, in the main process, on a bad trace/template or cluster, or a call that fits on
    no engine (one-line errors); arrivals do not change the workload, so one check per seed."""
    for seed in seeds:
        check_run(RunSpec(trace=trace, cluster=cluster, queries=queries, seed=seed))


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
    trace: str = typer.Option("chess_trace1", help="CHESS trace file, a shipped trace name, or a YAML workflow template"),
    cluster: str = typer.Option("paper", help="cluster name (paper, mixed-16, llama8b) or YAML file"),
    policies: TextList = typer.Option(",".join(DEFAULT_POLICIES), parser=parse_text_list, metavar=LIST_METAVAR,
                                      help="comma-separated policy names or policy files; rr is always added (the baseline)"),
    rates: Optional[FloatList] = typer.Option(None, parser=parse_float_list, metavar=LIST_METAVAR,
                                              help="arrival rates, q/s, comma-separated; default: 0.05,0.1,0.15,0.25,0.4 x the cluster's estimated capacity"),
    slo_scales: FloatList = typer.Option("1.5,2,3,4,6", parser=parse_float_list, metavar=LIST_METAVAR,
                                         help="SLO scales, comma-separated"),
    seeds: IntList = typer.Option("0,1", parser=parse_int_list, metavar=LIST_METAVAR,
                                  help="seeds, comma-separated (or a range a-b); attainment is pooled over them"),
    queries: Optional[int] = typer.Option(None, min=1, help="queries per run (default: the whole trace; more draws from a fitted generator)"),
    ratio_rate: Optional[float] = typer.Option(None, parser=positive_float,
                                               help="rate (q/s) of the deadline ratio; default 0.1 x estimated capacity"),
    ratio_scale: float = typer.Option(3.0, parser=positive_float, help="SLO scale of the goodput ratio"),
    ratios: bool = typer.Option(True, "--ratios/--no-ratios", help="search the thresholds behind the headline ratios"),
    workers: Optional[int] = typer.Option(None, min=1, help="worker processes (default: all cores)"),
    out: Path = typer.Option(Path("runs/bench"), parser=writable_dir, help="output directory: results.json, CSVs and PNG plots"),
    prefix_cache: OnOff = prefix_cache_option(),
    backend: Backend = backend_option(),
) -> None:
    """Benchmark policies on a grid of rates x SLO scales x seeds; the paper's headline ratios vs rr."""
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from heuristics.bench import (
        DEFAULT_LOADS,
        DEFAULT_RATIO_LOAD,
        BenchConfig,
        Scenario,
        capacity_qps_estimate,
        make_policy,
        run_bench,
    )
    from heuristics.plots import make_plots

    console = _console()
    refs = list(policies)
    if "rr" not in refs:
        refs.insert(0, "rr")
    for ref in refs:
        make_policy(ref)  # PolicyError: one line
    cache_on = prefix_cache is OnOff.on
    check_scenario(trace, cluster, queries, seeds)
    capacity = capacity_qps_estimate(trace, cluster, cache_on)
    rate_list = rates or [round(capacity * f, 4) for f in DEFAULT_LOADS]
    scale_list = slo_scales
    seed_list = seeds
    ratio_rate_qps = ratio_rate if ratio_rate is not None else round(capacity * DEFAULT_RATIO_LOAD, 4)
    cfg = BenchConfig(Scenario(trace, cluster, queries, cache_on), refs, rate_list, scale_list, seed_list, ratio_rate_qps,
                      ratio_scale, workers=workers or os.cpu_count() or 1, ratios=ratios,
                      backend=backend.value)
    console.print(f"[bold]bench[/] {trace} on {cluster}, prefix cache {'on' if cache_on else 'off'}: {len(refs)} policies x {len(rate_list)} rates x "
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
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=2))
    _write_csv(out / "points.csv", results["points"])
    _write_csv(out / "summary.csv", results["summary"])
    print_bench_table(console, results)
    failed: dict[str, int] = {}
    for point in results["points"]:
        failed[point["policy"]] = failed.get(point["policy"], 0) + point["n_failed"]
    for policy, n_failed in failed.items():
        if n_failed:
            console.print(f"[yellow]warning:[/] {policy}: {n_failed} workflows failed over the grid (n_failed): calls were "
                          f"sent to engines whose KV cache cannot hold their context")
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
    table.add_column(f"cache hit @{top_rate:g} q/s", justify="right")
    if results.get("ratios_vs_rr"):
        table.add_column(f"min SLO scale @{cfg['ratio_rate_qps']:g} q/s", justify="right")
        table.add_column(f"max rate @x{cfg['ratio_slo_scale']:g}", justify="right")
        table.add_column("deadline ratio", justify="right")
        table.add_column("goodput ratio", justify="right")
    for policy in cfg["policies"]:
        row = [policy, _fmt(at.get(policy, {}).get("slo_attainment")), _fmt(at_top.get(policy, {}).get("slo_attainment")),
               _fmt(at_top.get(policy, {}).get("latency_p95_s"), 4),
               _fmt(at_top.get(policy, {}).get("prefix_cache_hit_rate"))]
        if results.get("ratios_vs_rr"):
            t = results["thresholds"].get(policy, {})
            r = results["ratios_vs_rr"].get(policy, {})
            row += [_fmt(t.get("min_slo_scale")), _fmt(t.get("max_rate_qps")), _fmt(r.get("deadline_ratio")),
                    _fmt(r.get("goodput_ratio"))]
        table.add_row(*row)
    console.print(table)


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
    trace: str = typer.Option("chess_trace1", help="CHESS trace file, a shipped trace name, or a YAML workflow template"),
    cluster: str = typer.Option("paper", help="cluster name or YAML file"),
    rate: Optional[float] = typer.Option(None, parser=positive_float, help="arrival rate, q/s (default 0.4 x the cluster's estimated capacity, where tuning has something to gain)"),
    slo_scale: float = typer.Option(3.0, parser=positive_float, help="SLO scale"),
    trials: int = typer.Option(30, min=1, help="Optuna trials in total (a resumed study only runs the missing ones)"),
    seeds: IntList = typer.Option("0,1,2", parser=parse_int_list, metavar=LIST_METAVAR, help="tuning seeds (the objective)"),
    test_seeds: IntList = typer.Option("100,101,102", parser=parse_int_list, metavar=LIST_METAVAR,
                                       help="held-out seeds for the report (never seen by tuning)"),
    queries: Optional[int] = typer.Option(None, min=1, help="queries per run (default: the whole trace)"),
    grid: bool = typer.Option(False, "--grid", help="the paper's sweep: alpha in {0, 0.1, ..., 0.5} at --rates"),
    rates: Optional[FloatList] = typer.Option(None, parser=parse_float_list, metavar=LIST_METAVAR,
                                              help="--grid rates, q/s (default 0.25,0.5 x estimated capacity: the paper's 0.5 and 1.0 q/s as relative loads)"),
    out: Optional[Path] = typer.Option(None, parser=writable_file, help="tuned policy file (default runs/tune/<policy>-tuned.yaml); the Optuna SQLite study sits next to it"),
    workers: Optional[int] = typer.Option(None, min=1, help="worker processes (default: all cores)"),
    sampler_seed: int = typer.Option(0, help="seed of the TPE sampler"),
) -> None:
    """Tune a policy's knobs in simulation (Optuna TPE, or the paper's alpha grid); writes a policy file."""
    import os

    from heuristics.bench import capacity_qps_estimate, make_policy
    from heuristics.tune import TuneConfig, run_grid, run_tpe

    console = _console()
    make_policy(policy)
    tune_seeds, held_out = seeds, test_seeds
    overlap = sorted(set(tune_seeds) & set(held_out))
    if overlap:
        raise UserError(f"--test-seeds: seed {overlap[0]} is also a tuning seed; test seeds must be unseen (e.g. --test-seeds 100,101)")
    check_scenario(trace, cluster, queries, tune_seeds + held_out)
    capacity = capacity_qps_estimate(trace, cluster)
    rate_qps = rate if rate is not None else round(0.4 * capacity, 4)
    grid_rates = rates or [round(0.25 * capacity, 4), round(0.5 * capacity, 4)]
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


# ---- plan ----------------------------------------------------------------------------------------

def plan_command(
    trace: str = typer.Option("chess_trace1", help="CHESS trace file or shipped trace name"),
    rate: float = typer.Option(..., parser=positive_float, help="mean arrival rate, queries/s"),
    load: str = typer.Option("constant", help="load shape: constant, step (0.5x then 1.5x) or burst (a 3x burst)"),
    slo_scale: float = typer.Option(3.0, parser=positive_float,
                                    help="SLO = scale x the base SLO of --slo-reference (one SLO in seconds for every candidate)"),
    target: float = typer.Option(0.95, min=0.0, max=1.0, help="SLO attainment to reach on the test seeds"),
    gpus: TextList = typer.Option("H100,A100-80G,L40S,A6000", parser=parse_text_list, metavar=LIST_METAVAR,
                                  help="GPU types to rent (catalog names)"),
    model: str = typer.Option("Llama-3.1-70B", help="model every engine serves (catalog name)"),
    policy: str = typer.Option("least-work+workflow", help="scheduling policy (name or policy file)"),
    tune_policy: bool = typer.Option(False, "--tune-policy", help="tune the policy's knobs per candidate on the tuning seeds"),
    tune_trials: int = typer.Option(4, min=1, help="Optuna trials per candidate with --tune-policy"),
    max_gpus: Optional[int] = typer.Option(None, min=1, help="at most this many GPUs in total (default: search up to 64)"),
    prices: Optional[TextList] = typer.Option(None, parser=parse_text_list, metavar="GPU=USD,...",
                                              help="override catalog prices, USD per GPU-hour (e.g. H100=2.5,A6000=0.6)"),
    headroom: float = typer.Option(1.2, parser=positive_float,
                                   help="the integer program covers headroom x each step's demand (queueing is not in its model)"),
    queries: Optional[int] = typer.Option(None, min=1, help="queries per simulation (default: enough that arrivals span 5 SLOs, at least 50)"),
    seeds: IntList = typer.Option("150000-150002", parser=parse_int_list, metavar=LIST_METAVAR,
                                  help="tuning seeds: the search simulates every candidate on these"),
    test_seeds: IntList = typer.Option("200000-200002", parser=parse_int_list, metavar=LIST_METAVAR,
                                       help="held-out seeds the answer and the comparisons are reported on"),
    slo_reference: str = typer.Option("paper", help="cluster whose base SLO --slo-scale multiplies"),
    prefix_cache: OnOff = prefix_cache_option(),
    homogeneous: bool = typer.Option(True, "--homogeneous/--no-homogeneous", help="also search the cheapest homogeneous cluster of each GPU type"),
    workers: int = typer.Option(1, min=1, help="worker processes for the simulations"),
    out: Path = typer.Option(Path("runs/plan"), parser=writable_dir, help="output directory: plan.json, cluster.yaml, pareto.png"),
) -> None:
    """The cheapest GPU mix whose SLO attainment reaches --target: an integer program, then simulation."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from envs.sim.catalog import load_catalog
    from envs.sim.cells import LOADS
    from heuristics.bench import make_policy
    from heuristics.plan import (
        PlanConfig,
        canonical_gpus,
        cluster_yaml,
        mix_label,
        mix_price,
        parse_prices,
        plot_pareto,
        run_plan,
    )
    from heuristics.tune import search_space
    from policies import policy_from_spec, save_policy

    console = _console()
    if load not in LOADS:
        raise UserError(f"--load: unknown load shape {load!r} (use {', '.join(LOADS)})")
    overlap = sorted(set(seeds) & set(test_seeds))
    if overlap:
        raise UserError(f"--test-seeds: seed {overlap[0]} is also a tuning seed; test seeds must be unseen")
    catalog = load_catalog()
    catalog.model(model)
    make_policy(policy)
    if tune_policy and not search_space(policy):
        raise UserError(f"--tune-policy: {policy} has no tunable knobs (drop --tune-policy or pick another --policy)")
    check_scenario(trace, slo_reference, queries or 1, seeds[:1])
    cfg = PlanConfig(trace=trace, rate_qps=rate, load=load, slo_scale=slo_scale, target=target,
                     gpus=canonical_gpus(gpus, catalog), model=model, policy=policy, tune_policy=tune_policy,
                     tune_trials=tune_trials, max_gpus=max_gpus, prices=parse_prices(prices, catalog),
                     headroom=headroom, queries=queries, tune_seeds=list(seeds), test_seeds=list(test_seeds),
                     workers=workers, prefix_cache=prefix_cache is OnOff.on,
                     slo_reference=slo_reference, homogeneous=homogeneous)
    console.print(f"[bold]plan[/] {trace} @ {rate:g} q/s ({load}), SLO x{slo_scale:g} of {slo_reference}, target "
                  f"{target:g}, GPUs {', '.join(cfg.gpus)}, policy {policy}{' (tuned per cluster)' if tune_policy else ''}, "
                  f"tuning seeds {cfg.tune_seeds}, test seeds {cfg.test_seeds}, {workers} workers")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("simulating", total=None)

        def progress(simulations: int, clusters: int, best: Any) -> None:
            text = (f"best ${mix_price(best.mix):.2f}/h {mix_label(best.mix)} ({best.attainment:.3f})" if best
                    else "no cluster meets the target yet")
            bar.update(task, description=f"{clusters} clusters, {simulations} simulations; {text}")

        result = run_plan(cfg, progress=progress, note=lambda text: bar.console.print(text))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.yaml").write_text(cluster_yaml(result, model))
    plot = plot_pareto(result, out / "pareto.png")
    result.pop("_chosen_mix")
    result["files"] = {"cluster": str(out / "cluster.yaml"), "plot": str(plot)}
    policy_arg = policy
    if tune_policy:  # the policy tuned on the chosen cluster, as a policy file
        policy_path = out / "policy.yaml"
        save_policy(policy_from_spec(result["chosen"]["policy"]), policy_path, extra={"meta": {"tuned_by": "agentsched plan"}})
        result["files"]["policy"] = policy_arg = str(policy_path)
    (out / "plan.json").write_text(json.dumps(jsonable(result), indent=2))
    print_plan_tables(console, result)
    shape = "" if load == "constant" else f" (a {load} load: simulate only runs Poisson arrivals)"
    console.print(f"wrote {', '.join(result['files'].values())}, {out / 'plan.json'}; simulate the answer with "
                  f"`agentsched simulate --cluster {out / 'cluster.yaml'} --policy {policy_arg} --trace {trace} "
                  f"--rate {rate:g} --slo-scale {result['chosen']['slo_scale_in_simulate']:g} --queries {result['config']['queries']}`{shape}")


def print_plan_tables(console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    cfg = result["config"]
    table = Table(title=f"plan: {cfg['trace']} @ {cfg['rate_qps']:g} q/s ({cfg['load']}), SLO {cfg['slo_s']:.0f} s "
                        f"(x{cfg['slo_scale']:g}), target {cfg['target']:g}")
    for col in ("", "cluster", "GPUs", "$/h", "attain (tuning)", "attain (test)", "meets"):
        table.add_column(col, justify="right" if col in ("GPUs", "$/h") or col.startswith("attain") else "left")
    for row in [result["chosen"]] + result["comparisons"]:
        meets = row.get("meets_target_test")
        table.add_row(row["what"], row["cluster"], _fmt(row.get("gpus")), _fmt(row.get("price_per_hour"), 4),
                      _fmt(row.get("attainment_tune")), _fmt(row.get("attainment_test")),
                      "n/a" if meets is None else ("yes" if meets else "no"))
    console.print(table)
    front = Table(title="Pareto front: price vs SLO attainment (tuning seeds)")
    for col in ("cluster", "GPUs", "$/h", "attain"):
        front.add_column(col, justify="left" if col == "cluster" else "right")
    for row in result["pareto_front"]:
        front.add_row(row["cluster"], str(row["gpus"]), f"{row['price_per_hour']:.2f}", f"{row['attainment_tune']:.3f}")
    console.print(front)
    savings = result["savings"]
    homo = savings["vs_cheapest_homogeneous"]
    console.print(f"saving vs the cheapest homogeneous cluster ({savings['cheapest_homogeneous'] or 'none met the target'}): "
                  f"{'n/a' if homo is None else f'{homo:.1%}'}; vs the program's answer: {savings['vs_program_answer']:.1%} "
                  f"(the program's answer {'meets' if savings['program_answer_meets_target'] else 'misses'} the target); "
                  f"{result['clusters_simulated']} clusters, {result['simulations']} simulations "
                  f"({', '.join(f'{k} {v}' for k, v in result['simulations_by_phase'].items())}; a grid over the "
                  f"region the local search covered would need {result['grid_simulations']}), {result['wall_s']:.1f} s")
    if not result["chosen"]["verified_on_test"]:
        console.print("[yellow]warning:[/] no cluster that met the target on the tuning seeds held it on the test seeds; "
                      "shown: the best of those tried (add seeds or --queries)")


# ---- league --------------------------------------------------------------------------------------

def league_command(
    policies: Optional[TextList] = typer.Option(None, parser=parse_text_list, metavar=LIST_METAVAR,
                                                help="comma-separated policy names (default: every named policy)"),
    cells: Optional[TextList] = typer.Option(None, parser=parse_text_list, metavar=LIST_METAVAR,
                                             help="comma-separated cell names (default: all; see heuristics/league.py)"),
    trials: int = typer.Option(8, min=1, help="TPE trials per (cell, policy) with knobs (the first is the policy's own knobs)"),
    tune_seeds: IntList = typer.Option("150000-150002", parser=parse_int_list, metavar=LIST_METAVAR,
                                       help="tuning seeds: 'a-b' or 'a,b,c'"),
    test_seeds: IntList = typer.Option("200000-200009", parser=parse_int_list, metavar=LIST_METAVAR,
                                       help="test seeds (disjoint from the tuning seeds)"),
    fixed: str = typer.Option("least-work+workflow", help="policies also run with their shipped knobs, untuned ('' for none)"),
    slo_scale: float = typer.Option(3.0, parser=positive_float, help="SLO scale"),
    workers: Optional[int] = typer.Option(None, min=1, help="worker processes, or local Ray CPUs (default: all cores)"),
    backend: Backend = backend_option(),
    out: Path = typer.Option(Path("runs/league"), parser=writable_dir, help="output directory: league.json, league.md, league.png"),
) -> None:
    """Every named policy, tuned per cell on tuning seeds, on the cells that matter; test seeds with bootstrap CIs."""
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from heuristics import registry
    from heuristics.league import LeagueConfig, run_league, select_cells, summary, write

    console = _console()
    names = list(policies) if policies is not None else list(registry.NAMED)
    for name in names:
        if name not in registry.NAMED:
            raise UserError(f"--policies: unknown policy {name!r} (named policies: {', '.join(registry.NAMED)})")
    fixed_names = [p.strip() for p in fixed.split(",") if p.strip()]
    for name in fixed_names:
        if name not in names:
            raise UserError(f"--fixed: {name!r} is not in --policies")
    overlap = sorted(set(tune_seeds) & set(test_seeds))
    if overlap:
        raise UserError(f"--test-seeds: seed {overlap[0]} is also a tuning seed; test seeds must be unseen")
    cfg = LeagueConfig(policies=names, cells=select_cells(",".join(cells) if cells else None), tune_seeds=list(tune_seeds),
                       test_seeds=list(test_seeds), trials=trials, fixed=fixed_names, slo_scale=slo_scale,
                       workers=workers or os.cpu_count() or 1, backend=backend.value)
    console.print(f"[bold]league[/] {len(names)} policies x {len(cfg.cells)} cells, {trials} trials on seeds "
                  f"{cfg.tune_seeds[0]}-{cfg.tune_seeds[-1]}, test seeds {cfg.test_seeds[0]}-{cfg.test_seeds[-1]}, "
                  f"{cfg.workers} workers ({backend.value})")
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
    from rich.table import Table

    from heuristics import registry
    from policies import load_policy
    from policies.heuristic import HeuristicPolicy
    from policies.loader import LEARNED_POLICY, RECOMMENDED_POLICY, shipped_policies

    table = Table(title="named policies (or give a policy file: {base: hexgen, dispatch: {alpha: 0.3}})")
    for col in ("name", "dispatch", "local", "knobs", "what"):
        table.add_column(col)
    for name, entry in registry.NAMED.items():
        knobs = HeuristicPolicy.named(name).knobs()  # a named policy is a heuristic (what load_policy builds for it)
        text = "; ".join(f"{k}={v}" for part in knobs.values() for k, v in part.items())
        label = f"{name} (recommended)" if name == RECOMMENDED_POLICY else name
        table.add_row(label, entry.dispatch, entry.local, text, entry.about)
    _console().print(table)
    shipped = Table(title="shipped policies (policies/pretrained/NAME: policy, config, REPORT.md, eval_report.json)")
    for col in ("name", "kind", "what"):
        shipped.add_column(col)
    for name in shipped_policies():
        what = {RECOMMENDED_POLICY: "recommended: the tuned heuristic",
                LEARNED_POLICY: "the best learned policy"}.get(name, "a trained example")
        try:
            policy = load_policy(name)
            kind, what = policy.spec().get("kind", "?"), f"{what} ({policy.name})"
        except ModuleNotFoundError as exc:  # a network without the [train] extra installed
            kind, what = "trained", f"{what} (needs {exc.name}: pip install 'agentsched[train]')"
        shipped.add_row(f"{name} (recommended)" if name == RECOMMENDED_POLICY else name, kind, what)
    _console().print(shipped)
