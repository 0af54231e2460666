"""`agentsched simulate`: one simulated run, summary table and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from envs.sim.errors import UserError


PREFIX_CACHE_HELP = "on|off: vLLM's automatic prefix caching on every engine (on: vLLM's default; off: no cache)"


def parse_on_off(option: str, value: str) -> bool:
    """An on/off option's value (`--prefix-cache on|off`); anything else is a one-line UserError."""
    text = value.strip().lower()
    if text not in ("on", "off"):
        raise UserError(f"--{option}: must be on or off, got {value!r}")
    return text == "on"


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)


def _check_positive(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise UserError(f"--{name}: must be a positive number, got {value} (e.g. --{name} 0.2)")


def simulate_command(
    trace: str = typer.Option("chess_trace1", help="CHESS trace file, or a shipped trace name"),
    cluster: str = typer.Option("paper", help="cluster name (paper, mixed-16, llama8b) or YAML file"),
    policy: str = typer.Option("rr", help="heuristic name, policy file or trained policy path"),
    rate: float = typer.Option(0.1, help="mean arrival rate, queries/s (Poisson)"),
    slo_scale: float = typer.Option(3.0, help="SLO = scale x base SLO of the standard workflow"),
    seed: int = typer.Option(0, help="seed of workload draws and arrivals"),
    queries: Optional[int] = typer.Option(None, help="number of queries; more than the trace draws from a generator fitted to it"),
    burstiness: float = typer.Option(1.0, help="CV of inter-arrival times (1 = Poisson, >1 = bursty Gamma)"),
    tenants: Optional[Path] = typer.Option(None, help="YAML list of tenants: name, slo_scale, priority, share (default: one tenant)"),
    out: Optional[Path] = typer.Option(None, help="write the result JSON here"),
    chrome_trace: Optional[Path] = typer.Option(None, help="write a Chrome/Perfetto trace of engine timelines here"),
    prefix_cache: str = typer.Option("on", help=PREFIX_CACHE_HELP),
) -> None:
    """Simulate one workload on one cluster under one policy."""
    from rich.console import Console
    from rich.table import Table

    from envs.sim.metrics import chrome_trace as make_chrome_trace
    from envs.sim.scenario import RunSpec, simulate
    from policies import load_policy

    _check_positive("rate", rate)
    cache_on = parse_on_off("prefix-cache", prefix_cache)
    _check_positive("slo-scale", slo_scale)
    _check_positive("burstiness", burstiness)
    if queries is not None and queries <= 0:
        raise UserError(f"--queries: must be a positive integer, got {queries}")
    loaded = load_policy(policy)
    extra = {"tenants": _load_tenants(tenants)} if tenants is not None else {}
    spec = RunSpec(trace=trace, cluster=cluster, rate_qps=rate, slo_scale=slo_scale, seed=seed, queries=queries,
                   burstiness_cv=burstiness, prefix_cache=cache_on, **extra)
    spec.cluster_config()  # validate before running
    result, sim = simulate(spec, loaded, record_timeline=chrome_trace is not None)
    table = Table(title=f"{loaded.name} on {cluster} @ {rate} q/s, SLO x{slo_scale}, seed {seed}, "
                        f"prefix cache {'on' if cache_on else 'off'}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("n_workflows", "n_calls", "slo_attainment", "goodput_qps", "throughput_qps", "latency_p50_s",
                "latency_p95_s", "latency_p99_s", "cost_usd", "preemptions", "prefix_cache_hit_rate", "prefill_tokens",
                "prefix_cache_evicted_blocks", "sim_wall_s"):
        value = result[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    if len(result["per_tenant"]) > 1:
        for name, stats in result["per_tenant"].items():
            print(f"tenant {name}: {stats['n_workflows']} workflows, SLO attainment {stats['slo_attainment']:.3f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    if chrome_trace is not None:
        chrome_trace.parent.mkdir(parents=True, exist_ok=True)
        chrome_trace.write_text(json.dumps(make_chrome_trace(sim)))
        print(f"wrote {chrome_trace} (open in https://ui.perfetto.dev or chrome://tracing)")


def _load_tenants(path: Path) -> list:
    """Tenants file: a YAML list (or a mapping with a `tenants` list) of TenantSpec fields."""
    import yaml

    from envs.sim.errors import validate_as
    from envs.sim.scenario import TenantSpec

    if not path.is_file():
        raise UserError(f"--tenants: file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"--tenants: {path} is not valid YAML (fix the syntax)") from None
    if isinstance(raw, dict):
        raw = raw.get("tenants")
    if not isinstance(raw, list) or not raw:
        raise UserError(f"--tenants: {path} must hold a non-empty list of tenants (name, slo_scale, priority, share)")
    return [validate_as(TenantSpec, t if isinstance(t, dict) else {}, "tenants", f"{path.name}[{i}]")
            for i, t in enumerate(raw)]
