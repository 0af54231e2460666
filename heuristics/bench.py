"""The benchmark harness behind `agentsched bench`: every policy on a grid of arrival rates, SLO
scales and seeds, plus the paper's two headline ratios against round robin.

- deadline ratio (at a fixed rate): smallest SLO scale at which rr reaches the target attainment
  (95%), divided by the same for the policy. > 1: the policy meets tighter deadlines.
- goodput ratio (at a fixed SLO scale): highest arrival rate the policy sustains at >= 95%
  attainment, divided by the same for rr. > 1: the policy serves more load.

Both thresholds are found by bisection (geometric, since both quantities are scales) over full
simulations, with attainment pooled over the seeds (all workflows of all seeds count once). Seeds
make arrival times exact rescalings of one draw (exponential gaps x 1/rate), so attainment is
close to monotone in the rate and bisection is well posed.

Why loads are low: the paper's cluster (2xA100, A6000, L40S, Llama-70B 4-bit), modelled with
batched prefill compute and a paged KV cache, has roughly 9-12k tokens/s of prefill capacity, and a
CHESS query carries ~50k input tokens, so it saturates near 0.1-0.2 queries/s (rr at ~0.03-0.05,
bound by the A6000). The paper's 0.5-1.0 q/s are not sustainable in a physically modelled
cluster; default rates are therefore set relative to `capacity_qps_estimate(...)`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from envs.sim.config import load_cluster
from envs.sim.errors import UserError
from envs.sim.model import StepTokens, build_engine_model
from envs.sim.scenario import RunSpec, simulate, workload_for
from envs.sim.workload import warm_cache_hit_tokens
from policies import load_policy, policy_from_spec
from policies.loader import policy_label

TARGET_ATTAINMENT = 0.95
DEFAULT_LOADS = (0.05, 0.1, 0.15, 0.25, 0.4)  # x estimated capacity
DEFAULT_SLO_SCALES = (1.5, 2.0, 3.0, 4.0, 6.0)
DEFAULT_RATIO_LOAD = 0.1  # the deadline ratio's rate, x estimated capacity
DEFAULT_RATIO_SCALE = 3.0  # the goodput ratio's SLO scale
DEFAULT_POLICIES = ("rr", "random", "lor", "least-work", "llmd", "hexgen", "hexgen-outstanding", "rr+urgency", "wb+fcfs",
                    "hexgen+triage", "least-work+workflow")
POINT_METRICS = ("slo_attainment", "goodput_qps", "throughput_qps", "latency_p50_s", "latency_p95_s", "latency_p99_s",
                 "n_workflows", "n_failed", "preemptions", "cost_usd", "sim_wall_s", "base_slo_s", "prefix_cache_hit_rate",
                 "prefill_tokens", "prefix_cache_evicted_blocks")
SCALE_BOUNDS = (0.25, 64.0)  # deadline bisection range of SLO scales
RATE_EXPANSIONS = 8  # doublings/halvings allowed when bracketing the goodput rate


@dataclass(frozen=True)
class Scenario:
    """Everything but the policy, rate, SLO scale and seed."""

    trace: str = "chess_trace1"
    cluster: str = "paper"
    queries: int | None = None
    prefix_cache: bool = True  # vLLM's automatic prefix caching on every engine


@dataclass
class BenchConfig:
    scenario: Scenario
    policies: list[str]
    rates_qps: list[float]
    slo_scales: list[float]
    seeds: list[int]
    ratio_rate_qps: float
    ratio_slo_scale: float
    target: float = TARGET_ATTAINMENT
    rel_tol: float = 0.03  # bisection stops when hi/lo < 1 + rel_tol
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    ratios: bool = True
    backend: str = "process"  # or "ray" (see make_executor)


# ---- where simulations run ---------------------------------------------------------------------

BACKENDS = ("process", "ray")


class RayExecutor(Executor):
    """Runs each submitted function as a Ray task: on the cluster at `RAY_ADDRESS` when set (its
    workers need agentsched importable), otherwise on a local `ray.init()` with `workers` CPUs.
    Futures are Ray's own `ObjectRef.future()`, so callers treat it like a process pool. A Ray
    instance this executor started is shut down with it."""

    def __init__(self, workers: int | None = None) -> None:
        import ray

        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            # local workers import this code base from the same path as the driver
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
            ray.init(address=address, num_cpus=None if address else workers, ignore_reinit_error=True,
                     include_dashboard=False, log_to_driver=False, runtime_env=env)
            self._started = True
        self._remotes: dict[Any, Any] = {}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        remote = self._remotes.get(fn)
        if remote is None:
            remote = self._remotes[fn] = self._ray.remote(fn)
        return remote.remote(*args, **kwargs).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(backend: str, workers: int) -> Executor:
    """A process pool (`process`) or Ray tasks (`ray`); both run the same job functions."""
    if backend == "process":
        return ProcessPoolExecutor(max_workers=workers)
    if backend == "ray":
        return RayExecutor(workers)
    raise UserError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")


def jsonable(value: Any) -> Any:
    """JSON without NaN/Infinity literals: non-finite floats become strings ("inf", "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# ---- capacity -----------------------------------------------------------------------------------

def capacity_qps_estimate(trace: str, cluster: str, prefix_cache: bool = True) -> float:
    """Rough upper bound on sustainable queries/s: the cluster's summed prefill throughput (one full
    `max_num_batched_tokens` chunk per iteration) over the trace's mean input tokens per query that
    must be prefilled (with the prefix cache: less the tokens a warm cache serves,
    `warm_cache_hit_tokens`). Decode, KV-cache limits, evictions and imbalance make the real
    capacity lower; it only sets the scale of the default rates."""

    workflows, _ = workload_for(RunSpec(trace=trace, cluster=cluster))  # a CHESS trace or a YAML template, as simulate
    mean_in = sum(c.input_tokens for w in workflows for s in w.stages for c in s) / len(workflows)
    if prefix_cache:
        mean_in -= sum(warm_cache_hit_tokens(w) for w in workflows) / len(workflows)
    tokens_per_s = 0.0
    for spec in load_cluster(cluster).expanded():
        engine = build_engine_model(spec, StepTokens({}))
        n = engine.max_num_batched_tokens
        assert engine.perf is not None
        tokens_per_s += n / engine.perf.iteration_s(n, n, n * (n + 1) / 2.0, 0, 0)
    return tokens_per_s / mean_in


# ---- single runs (these run in worker processes) ------------------------------------------------

PolicyRef = str | dict  # a name, a policy file path, or a policy spec dict (what tuning passes around)


def make_policy(ref: PolicyRef) -> Any:
    return policy_from_spec(dict(ref)) if isinstance(ref, dict) else load_policy(ref)


def run_point(policy_ref: PolicyRef, scenario: Scenario, rate_qps: float, slo_scale: float, seed: int) -> dict[str, Any]:
    """One simulation; the compact metrics of `agentsched simulate`."""

    spec = RunSpec(trace=scenario.trace, cluster=scenario.cluster, rate_qps=rate_qps, slo_scale=slo_scale, seed=seed,
                   queries=scenario.queries, prefix_cache=scenario.prefix_cache)
    result, sim = simulate(spec, make_policy(policy_ref))
    out = {"policy": policy_label(policy_ref), "rate_qps": rate_qps, "slo_scale": slo_scale, "seed": seed}
    out.update({k: result[k] for k in POINT_METRICS})
    out["n_met"] = sim.met_workflows
    return out


def pooled_attainment(policy_ref: str, scenario: Scenario, rate_qps: float, slo_scale: float,
                      seeds: Sequence[int]) -> float:
    met = n = 0
    for seed in seeds:
        r = run_point(policy_ref, scenario, rate_qps, slo_scale, seed)
        met += r["n_met"]
        n += r["n_workflows"]
    return met / n if n else math.nan


def _bisect_geometric(ok: Callable[[float], bool], lo: float, hi: float, rel_tol: float) -> float:
    """ok(lo) is False/True per caller's bracket; returns the boundary within rel_tol."""
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def min_slo_scale(policy_ref: str, scenario: Scenario, rate_qps: float, seeds: Sequence[int], target: float,
                  rel_tol: float) -> dict[str, Any]:
    """Smallest SLO scale at which the policy reaches `target` attainment at `rate_qps` (inf if
    not even at the largest scale tried)."""
    evals: list[tuple[float, float]] = []

    def ok(scale: float) -> bool:
        a = pooled_attainment(policy_ref, scenario, rate_qps, scale, seeds)
        evals.append((scale, a))
        return a >= target

    lo, hi = SCALE_BOUNDS
    probe = 2.0
    if ok(probe):
        hi = probe
        while hi / 2 >= lo and ok(hi / 2):
            hi /= 2
        lo = max(lo, hi / 2)
        if hi <= SCALE_BOUNDS[0]:
            return {"value": hi, "evals": evals}
    else:
        lo = probe
        hi = probe * 2
        while not ok(hi):
            lo = hi
            hi *= 2
            if hi > SCALE_BOUNDS[1]:
                return {"value": math.inf, "evals": evals}
    return {"value": _bisect_geometric(ok, lo, hi, rel_tol), "evals": evals}


def max_rate(policy_ref: str, scenario: Scenario, slo_scale: float, start_qps: float, seeds: Sequence[int],
             target: float, rel_tol: float) -> dict[str, Any]:
    """Highest arrival rate at which the policy keeps `target` attainment at `slo_scale` (0 if not
    even at start/2^RATE_EXPANSIONS)."""
    evals: list[tuple[float, float]] = []

    def ok(rate: float) -> bool:
        a = pooled_attainment(policy_ref, scenario, rate, slo_scale, seeds)
        evals.append((rate, a))
        return a >= target

    if ok(start_qps):
        lo, hi = start_qps, start_qps * 2
        for _ in range(RATE_EXPANSIONS):
            if not ok(hi):
                break
            lo, hi = hi, hi * 2
        else:
            return {"value": lo, "evals": evals, "capped": True}
    else:
        lo, hi = start_qps / 2, start_qps
        for _ in range(RATE_EXPANSIONS):
            if ok(lo):
                break
            lo, hi = lo / 2, lo
        else:
            return {"value": 0.0, "evals": evals}

    # invert: largest rate that is ok -> bisect on "not ok" boundary
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return {"value": lo, "evals": evals}


def _threshold_job(kind: str, policy_ref: str, scenario: Scenario, config: dict[str, Any]) -> dict[str, Any]:
    if kind == "min_slo_scale":
        r = min_slo_scale(policy_ref, scenario, config["rate"], config["seeds"], config["target"], config["rel_tol"])
    else:
        r = max_rate(policy_ref, scenario, config["scale"], config["start"], config["seeds"], config["target"],
                     config["rel_tol"])
    return {"policy": policy_label(policy_ref), "kind": kind, **r}


# ---- the whole benchmark ------------------------------------------------------------------------

def ratio_table(thresholds: dict[str, dict[str, float]], baseline: str = "rr") -> dict[str, dict[str, float | None]]:
    """The paper's two ratios of every policy against `baseline` (None where a threshold is missing)."""
    base = thresholds.get(baseline)
    if base is None:
        return {}
    out = {}
    for name, t in thresholds.items():
        s_pol, s_base = t.get("min_slo_scale"), base.get("min_slo_scale")
        r_pol, r_base = t.get("max_rate_qps"), base.get("max_rate_qps")
        out[name] = {
            "deadline_ratio": _safe_ratio(s_base, s_pol),
            "goodput_ratio": _safe_ratio(r_pol, r_base),
        }
    return out


def _safe_ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None:
        return None
    if math.isinf(num) and math.isinf(den) or num == 0 and den == 0:
        return None
    if den == 0 or math.isinf(num):
        return math.inf
    return num / den


def summarize_points(points: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds of each (policy, rate, scale); attainment pooled over workflows."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["policy"], p["rate_qps"], p["slo_scale"]), []).append(p)
    out = []
    for (policy, rate, scale), rows in groups.items():
        n = sum(r["n_workflows"] for r in rows)
        entry = {"policy": policy, "rate_qps": rate, "slo_scale": scale, "seeds": len(rows),
                 "slo_attainment": sum(r["n_met"] for r in rows) / n if n else math.nan}
        for key in ("goodput_qps", "throughput_qps", "latency_p50_s", "latency_p95_s", "latency_p99_s", "preemptions",
                    "cost_usd", "prefix_cache_hit_rate", "prefill_tokens", "prefix_cache_evicted_blocks"):
            vals = [r[key] for r in rows if r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
            entry[key] = sum(vals) / len(vals) if vals else math.nan
        out.append(entry)
    return out


def run_bench(cfg: BenchConfig, progress: Callable[[str, int], None] | None = None,
              on_total: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the grid and the ratio searches in parallel worker processes; return results.json's dict.
    `on_total(n)` learns the job count; `progress(label, 1)` is called as each job finishes."""
    started = time.perf_counter()
    labels = [policy_label(p) for p in cfg.policies]
    if len(set(labels)) != len(labels):
        raise UserError(f"--policies: duplicate policy names {labels} (give each policy once)")
    grid = [(p, r, s, seed) for p in cfg.policies for r in cfg.rates_qps for s in cfg.slo_scales for seed in cfg.seeds]
    common = {"seeds": list(cfg.seeds), "target": cfg.target, "rel_tol": cfg.rel_tol}
    threshold_jobs = []
    if cfg.ratios:
        for p in cfg.policies:
            threshold_jobs.append(("min_slo_scale", p, {**common, "rate": cfg.ratio_rate_qps}))
            threshold_jobs.append(("max_rate", p, {**common, "scale": cfg.ratio_slo_scale, "start": cfg.ratio_rate_qps}))
    if on_total:
        on_total(len(grid) + len(threshold_jobs))
    points: list[dict[str, Any]] = []
    threshold_results: list[dict[str, Any]] = []
    workers = max(1, min(cfg.workers, len(grid) + len(threshold_jobs)))
    with make_executor(cfg.backend, workers) as pool:
        # the long sequential searches first, so they do not end up as the tail
        t_futs: list[Future] = [pool.submit(_threshold_job, kind, p, cfg.scenario, c) for kind, p, c in threshold_jobs]
        g_futs: list[Future] = [pool.submit(run_point, p, cfg.scenario, r, s, seed) for p, r, s, seed in grid]
        for fut in _as_completed(t_futs + g_futs):
            res = fut.result()
            if "kind" in res:
                threshold_results.append(res)
            else:
                points.append(res)
            if progress:
                progress(res["policy"], 1)
    thresholds: dict[str, dict[str, Any]] = {label: {} for label in labels}
    searches: dict[str, dict[str, Any]] = {label: {} for label in labels}
    for r in threshold_results:
        key = "min_slo_scale" if r["kind"] == "min_slo_scale" else "max_rate_qps"
        thresholds[r["policy"]][key] = r["value"]
        searches[r["policy"]][key] = [{"x": x, "slo_attainment": a} for x, a in sorted(r["evals"])]
    order = {label: i for i, label in enumerate(labels)}
    points.sort(key=lambda p: (order[p["policy"]], p["rate_qps"], p["slo_scale"], p["seed"]))
    summary = summarize_points(points)
    summary.sort(key=lambda p: (order[p["policy"]], p["rate_qps"], p["slo_scale"]))
    warnings = steady_state_warnings(thresholds, points, cfg.ratio_slo_scale) if cfg.ratios else []
    return {
        "warnings": warnings,
        "config": {**asdict(cfg.scenario), "policies": labels, "policy_refs": list(cfg.policies),
                   "rates_qps": list(cfg.rates_qps), "slo_scales": list(cfg.slo_scales), "seeds": list(cfg.seeds),
                   "ratio_rate_qps": cfg.ratio_rate_qps, "ratio_slo_scale": cfg.ratio_slo_scale,
                   "target_attainment": cfg.target, "bisection_rel_tol": cfg.rel_tol, "backend": cfg.backend,
                   "capacity_qps_estimate": capacity_qps_estimate(cfg.scenario.trace, cfg.scenario.cluster,
                                                                  cfg.scenario.prefix_cache)},
        "thresholds": thresholds if cfg.ratios else {},
        "ratios_vs_rr": ratio_table(thresholds) if cfg.ratios else {},
        "threshold_searches": searches if cfg.ratios else {},
        "summary": summary,
        "points": points,
        "wall_s": time.perf_counter() - started,
    }


MIN_SPAN_SLOS = 5.0  # a sustained rate needs arrivals spread over many SLOs, not one burst


def steady_state_warnings(thresholds: dict[str, dict[str, Any]], points: list[dict[str, Any]],
                          slo_scale: float) -> list[str]:
    """A goodput threshold found on a run whose arrivals span only a few SLOs measures how big a
    burst the cluster absorbs, not the rate it sustains (the backlog drains after the last
    arrival). Flag those, with the --queries that would fix it."""
    if not points:
        return []
    n = points[0]["n_workflows"]
    slo_s = points[0]["base_slo_s"] * slo_scale
    out = []
    for policy, t in thresholds.items():
        rate = t.get("max_rate_qps")
        if rate and math.isfinite(rate) and n / rate < MIN_SPAN_SLOS * slo_s:
            need = int(math.ceil(MIN_SPAN_SLOS * slo_s * rate))
            out.append(f"{policy}: max rate {rate:.3g} q/s was found on {n} queries arriving over {n / rate:.0f} s, "
                       f"< {MIN_SPAN_SLOS:g} SLOs ({slo_s:.0f} s each): a burst, not a sustained rate; "
                       f"use --queries {need} or more")
    return out


def _as_completed(futs: list[Future]) -> Iterable[Future]:
    from concurrent.futures import as_completed

    return as_completed(futs)


def nearest(values: Sequence[float], target: float) -> float:
    return min(values, key=lambda v: abs(math.log(v / target)))
