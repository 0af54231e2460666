"""`agentsched simulate`: one simulated run, summary table and JSON.

Also `check_run`, the up-front check of a run that `simulate`, `bench`, `tune` and `evaluate` all
use: trace or workflow template, cluster, and that every call of the workload can fit on at least
one engine, before any simulation starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
import yaml

from agentsched.options import OnOff, positive_float, prefix_cache_option, writable_file
from envs.sim.errors import UserError, validate_as
from envs.sim.scenario import RunSpec, TenantSpec, build_simulator, is_template, workload_for


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)


def check_run(spec: RunSpec) -> None:
    """Fail in one line, before any simulation, on a run that cannot work: a missing or malformed
    trace, template or cluster (their loaders raise `UserError`), or a call whose context (input +
    output tokens) is larger than the KV cache of every engine of the cluster. vLLM refuses such a
    call on every engine, so its workflow could only fail; calls that fit on some engines but not
    on others still run, and show up as `n_failed` when a policy sends them to a small engine."""
    sim = build_simulator(spec)
    capacity_tokens = max(engine.kv_capacity_tokens for engine in sim.engines)
    workflows, _ = workload_for(spec)
    for qi, workflow in enumerate(workflows):
        for stage in workflow.stages:
            for call in stage:
                context_tokens = call.input_tokens + call.output_tokens
                if context_tokens > capacity_tokens:
                    fields = ("that stage's input_tokens/output_tokens" if is_template(spec.trace)
                              else "its input_length/output_length")
                    raise UserError(
                        f"trace: {spec.trace}: call '{call.step}' of query {qi} needs {context_tokens} tokens of context "
                        f"(input {call.input_tokens} + output {call.output_tokens}), more than the largest KV cache of "
                        f"cluster {sim.config.name} ({capacity_tokens} tokens); lower {fields} or use a larger cluster")


def simulate_command(
    trace: str = typer.Option("chess_trace1", help="CHESS trace file, a shipped trace name, or a YAML workflow template"),
    cluster: str = typer.Option("paper", help="cluster name (paper, mixed-16, llama8b) or YAML file"),
    policy: str = typer.Option("rr", help="heuristic name, policy file or trained policy path"),
    rate: float = typer.Option(0.1, parser=positive_float, help="mean arrival rate, queries/s (Poisson)"),
    slo_scale: float = typer.Option(3.0, parser=positive_float, help="SLO = scale x base SLO of the standard workflow"),
    seed: int = typer.Option(0, min=0, help="seed of workload draws and arrivals"),
    queries: Optional[int] = typer.Option(None, min=1, help="number of queries; more than the trace draws from a generator fitted to it"),
    burstiness: float = typer.Option(1.0, parser=positive_float, help="CV of inter-arrival times (1 = Poisson, >1 = bursty Gamma)"),
    tenants: Optional[Path] = typer.Option(None, help="YAML list of tenants: name, slo_scale, priority, share (default: one tenant)"),
    out: Optional[Path] = typer.Option(None, parser=writable_file, help="write the result JSON here"),
    chrome_trace: Optional[Path] = typer.Option(None, parser=writable_file,
                                                help="write a Chrome/Perfetto trace of engine timelines here"),
    prefix_cache: OnOff = prefix_cache_option(),
) -> None:
    """Simulate one workload on one cluster under one policy."""
    from rich.console import Console
    from rich.table import Table

    from envs.sim.metrics import chrome_trace as make_chrome_trace
    from envs.sim.scenario import simulate
    from policies import load_policy

    cache_on = prefix_cache is OnOff.on
    loaded = load_policy(policy)
    extra = {"tenants": _load_tenants(tenants)} if tenants is not None else {}
    spec = RunSpec(trace=trace, cluster=cluster, rate_qps=rate, slo_scale=slo_scale, seed=seed, queries=queries,
                   burstiness_cv=burstiness, prefix_cache=cache_on, **extra)
    check_run(spec)
    result, sim = simulate(spec, loaded, record_timeline=chrome_trace is not None)
    table = Table(title=f"{loaded.name} on {cluster} @ {rate} q/s, SLO x{slo_scale}, seed {seed}, "
                        f"prefix cache {'on' if cache_on else 'off'}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("n_workflows", "n_calls", "n_failed", "slo_attainment", "goodput_qps", "throughput_qps", "latency_p50_s",
                "latency_p95_s", "latency_p99_s", "cost_usd", "preemptions", "prefix_cache_hit_rate", "prefill_tokens",
                "prefix_cache_evicted_blocks", "sim_wall_s"):
        value = result[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    if result["n_failed"]:
        print(f"warning: {result['n_failed']} workflows failed: a call was sent to an engine whose KV cache cannot "
              f"hold its context (n_failed; such calls fit only on the cluster's larger engines)")
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
