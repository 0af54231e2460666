"""`agentsched` commands of the deploy area: engines, make-tiny-model, serve, replay, calibrate.

Heavy imports (FastAPI, httpx, numpy) stay inside the command functions so `agentsched --help`
stays instant.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from agentsched.options import positive_float, writable_dir, writable_file
from envs.sim.scenario import RunSpec, workload_for

engines_app = typer.Typer(help="Start and stop local vLLM CPU engines listed in a cluster file.")


@engines_app.callback(invoke_without_command=True)
def _engines_help(ctx: typer.Context) -> None:
    """Without `up` or `down`, print the help (not an error)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


class LogLevel(str, Enum):
    """uvicorn's log levels."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


@engines_app.command("up")
def engines_up_cmd(
    cluster: Path = typer.Option(..., "--cluster", help="cluster YAML, e.g. deploy/clusters/local-cpu.yaml"),
    engine: Optional[list[str]] = typer.Option(None, "--engine", help="only these engine names (repeatable)"),
    no_warmup: bool = typer.Option(False, "--no-warmup", help="skip the warm-up bursts"),
) -> None:
    """Start the cluster's local engines, wait for /health, warm them up."""
    from deploy.cluster import load_cluster
    from deploy.engines import engines_up

    procs = engines_up(load_cluster(cluster), names=engine or None, warmup=not no_warmup)
    for p in procs:
        typer.echo(f"{p.spec.name}\t{p.spec.base_url}\tpid {p.pid}\tlog {p.log_path}")


@engines_app.command("down")
def engines_down_cmd(
    cluster: Path = typer.Option(..., "--cluster", help="cluster YAML used for `engines up`"),
    engine: Optional[list[str]] = typer.Option(None, "--engine", help="only these engine names (repeatable)"),
) -> None:
    """Stop the cluster's local engines (SIGTERM, then SIGKILL)."""
    from deploy.cluster import load_cluster
    from deploy.engines import engines_down

    stopped = engines_down(load_cluster(cluster), names=engine or None)
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def make_tiny_model_cmd(
    out_dir: Path = typer.Argument(..., parser=writable_dir, help="folder to write config, weights and tokenizer to"),
    hidden: int = typer.Option(128, min=16),
    layers: int = typer.Option(2, min=1),
    heads: int = typer.Option(4, min=1),
    kv_heads: int = typer.Option(2, min=1),
    seed: int = typer.Option(0, min=0),
    python: Optional[Path] = typer.Option(None, help="python with transformers; default .venv-vllm/bin/python"),
) -> None:
    """Build a deterministic tiny random Llama + locally trained BPE tokenizer that vLLM can serve."""
    from deploy.cluster import repo_root
    from deploy.engines import run_tiny_model_builder

    if hidden % heads:
        from envs.sim.errors import UserError

        raise UserError(f"--hidden {hidden} must be a multiple of --heads {heads} (pick e.g. --heads 4)")
    exe = python or (repo_root() / ".venv-vllm" / "bin" / "python")
    run_tiny_model_builder(out_dir, exe, ["--hidden", str(hidden), "--layers", str(layers), "--heads", str(heads),
                                          "--kv-heads", str(kv_heads), "--seed", str(seed)])
    typer.echo(str(out_dir))


def serve_cmd(
    cluster: Path = typer.Option(..., "--cluster", help="cluster YAML listing the engines"),
    policy: str = typer.Option(..., "--policy", help="heuristic name (rr, hexgen, ...), policy file or trained policy dir"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="AGENTSCHED_API_KEY",
                                          help="require 'Authorization: Bearer KEY'"),
    log_level: LogLevel = typer.Option(LogLevel.warning, "--log-level"),
) -> None:
    """Run the workflow-aware gateway (OpenAI-compatible) in front of the cluster's engines."""
    from deploy.cluster import load_cluster
    from deploy.gateway.server import resolve_policy, run_gateway

    spec = load_cluster(cluster)
    run_gateway(spec, resolve_policy(policy), host=host, port=port, api_key=api_key, log_level=log_level.value)


def replay_cmd(
    gateway: str = typer.Option(..., "--gateway", help="gateway base URL, e.g. http://127.0.0.1:8000"),
    trace: str = typer.Option(..., "--trace", help="CHESS trace JSON or shipped name (chess_trace1)"),
    rate: float = typer.Option(..., "--rate", parser=positive_float, help="workflow arrival rate, queries per second"),
    slo_scale: float = typer.Option(..., "--slo-scale", parser=positive_float, help="SLO = scale x base SLO of the gateway's cluster"),
    token_scale: float = typer.Option(1.0, "--token-scale", parser=positive_float,
                                      help="multiply input/output lengths (tiny CPU engines: 0.05)"),
    queries: Optional[int] = typer.Option(None, "--queries", min=1, help="number of workflows (default: whole trace)"),
    out: Optional[Path] = typer.Option(None, "--out", parser=writable_file,
                                       help="result JSON (same keys as `agentsched simulate`)"),
    seed: int = typer.Option(0, "--seed", min=0),
    tenant: str = typer.Option("default", "--tenant"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="AGENTSCHED_API_KEY"),
    records: bool = typer.Option(False, "--records", help="also write per-call and per-workflow records"),
    stream: bool = typer.Option(True, "--stream/--no-stream",
                                help="stream calls (SSE) to measure time to first token (ttft_* in the result)"),
    shared_prompts: bool = typer.Option(True, "--shared-prompts/--random-prompts",
                                        help="give shared prompt segments (templates, chat histories) the same token "
                                             "ids in every call, as the simulator's prefix cache sees them; "
                                             "--random-prompts: every prompt random (no prefix-cache hits)"),
) -> None:
    """Run a trace's workflows for real through a gateway; write the simulator's result JSON, with
    `prefix_cache_hit_rate` as the engines' own counters measured it over the replay."""
    import json

    from deploy.replay import ReplayConfig, replay

    if not gateway.startswith("http://"):
        from envs.sim.errors import UserError

        raise UserError(f"--gateway {gateway!r} must be a URL like http://127.0.0.1:8000")
    # the trace (or YAML template) loads as for `simulate`: its mistakes are one line before any call is sent
    workload_for(RunSpec(trace=trace, rate_qps=rate, slo_scale=slo_scale, queries=queries, seed=seed))
    cfg = ReplayConfig(gateway=gateway, trace=trace, rate_qps=rate, slo_scale=slo_scale, token_scale=token_scale,
                       queries=queries, seed=seed, tenant=tenant, api_key=api_key, stream=stream,
                       prompt_segments=shared_prompts)
    result, _ = replay(cfg, out=out, with_records=records)
    keys = ("n_workflows", "n_calls", "slo_attainment", "goodput_qps", "throughput_qps", "latency_p50_s",
            "latency_p95_s", "latency_p99_s", "call_latency_p50_s", "ttft_p50_s", "ttft_p95_s",
            "prefix_cache_hit_rate", "sim_wall_s")
    typer.echo(json.dumps({k: result.get(k) for k in keys}, indent=1))


def register(app: typer.Typer) -> None:
    app.command("replay")(replay_cmd)
    app.command("serve")(serve_cmd)
    app.command("calibrate")(calibrate_cmd)
    app.add_typer(engines_app, name="engines")
    app.command("make-tiny-model")(make_tiny_model_cmd)


def calibrate_cmd(
    engine: str = typer.Option(..., "--engine", help="base URL of a live vLLM engine, e.g. http://127.0.0.1:8101"),
    out: Path = typer.Option(Path("profile.yaml"), "--out", parser=writable_file,
                             help="profile YAML to write (envs/sim/perf.py format)"),
    model: Optional[str] = typer.Option(None, "--model", help="model name; default: the engine's first model"),
    max_num_seqs: int = typer.Option(32, "--max-num-seqs", min=1, help="the engine's --max-num-seqs"),
) -> None:
    """Measure prefill and decode iteration times of a live engine; write a performance profile."""
    from deploy.calibrate import calibrate

    if not engine.startswith(("http://", "https://")):
        from envs.sim.errors import UserError

        raise UserError(f"--engine {engine!r} must be a URL like http://127.0.0.1:8101")
    profile, _ = calibrate(engine, out, model=model, max_num_seqs=max_num_seqs)
    c = profile.iteration
    typer.echo(f"wrote {out}: base {c.base_s*1e3:.2f} ms, decode/seq {c.decode_seq_s*1e6:.1f} us, "
               f"ctx/token {c.context_token_s*1e9:.2f} ns, prefill/token {c.prefill_token_s*1e6:.2f} us, "
               f"overhead {profile.fit['request_overhead_s']*1e3:.2f} ms; fit errors decode "
               f"{profile.fit['decode_median_abs_rel_err']:.1%} prefill {profile.fit['prefill_median_abs_rel_err']:.1%}"
               f"; KV block {profile.block_size_tokens} tokens; idle wake-up {profile.idle_wake_s*1e3:.2f} ms "
               f"(tau {profile.idle_wake_tau_s*1e3:.0f} ms)")
    if "warm_prefill_median_abs_rel_err" in profile.fit:
        f = profile.fit
        typer.echo(f"warm prefix: latency of prompts with cached prefixes predicted within "
                   f"{f['warm_prefill_median_abs_rel_err']:.1%} (median; signed {f['warm_prefill_median_rel_err']:+.1%}), "
                   f"their warm/cold ratio within {f['warm_cold_ratio_median_rel_err']:+.1%}; "
                   f"time saved by the hits real {f['warm_prefill_saved_real_s']*1e3:.1f} ms, simulated "
                   f"{f['warm_prefill_saved_sim_s']*1e3:.1f} ms over {f['n_warm_prefill_samples']:.0f} probes")
    else:
        typer.echo("no warm-prefix probes: the engine runs without prefix caching (start it with --enable-prefix-caching)")
