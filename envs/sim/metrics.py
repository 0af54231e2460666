"""Metrics of a run, shared by `agentsched simulate` and `agentsched replay` (same JSON).

Records are plain dataclasses so the gateway can fill them from live calls and the simulator from
its own objects; `summarize` turns them into the result dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(slots=True)
class CallRecord:
    call_id: int
    workflow_id: int
    step: str
    engine: str
    input_tokens: int
    output_tokens: int
    ready_s: float
    dispatch_s: float
    admit_s: float
    first_token_s: float
    finish_s: float
    preemptions: int = 0
    attempts: int = 1

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.ready_s


@dataclass(slots=True)
class WorkflowRecord:
    workflow_id: int
    tenant: str
    arrival_s: float
    finish_s: float  # nan if it never finished
    slo_s: float
    n_calls: int
    failed: bool = False

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def met_slo(self) -> bool:
        return (not self.failed) and not math.isnan(self.finish_s) and self.latency_s <= self.slo_s + 1e-9


@dataclass(slots=True)
class EngineRecord:
    name: str
    gpu: str
    price_per_hour: float  # for all its GPUs
    busy_s: float
    kv_usage_mean: float
    calls: int
    preemptions: int
    # prefix cache (vLLM's prefix_cache_hits / prefix_cache_queries, in tokens); zero when off or unknown
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually prefilled (cache hits excluded, recomputation included)
    evicted_blocks: int = 0  # cached KV blocks evicted to make room

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarize(workflows: Sequence[WorkflowRecord], calls: Sequence[CallRecord], engines: Sequence[EngineRecord],
              horizon_s: float | None = None, sim_wall_s: float = 0.0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Aggregate metrics. Goodput = workflows that met their SLO per second of the run's span
    (first arrival to last finish); cost = every engine's price over that span."""
    n = len(workflows)
    finished = [w for w in workflows if not math.isnan(w.finish_s) and not w.failed]
    met = sum(1 for w in workflows if w.met_slo)
    lat = np.array([w.latency_s for w in finished])
    if horizon_s is None:
        start = min((w.arrival_s for w in workflows), default=0.0)
        end = max((w.finish_s for w in finished), default=start)
        horizon_s = max(end - start, 1e-9)
    call_lat = np.array([c.latency_s for c in calls if not math.isnan(c.finish_s)])
    queue = np.array([c.admit_s - c.dispatch_s for c in calls if not math.isnan(c.admit_s)])
    ttft = np.array([c.first_token_s - c.ready_s for c in calls if not math.isnan(c.first_token_s)])
    tpot = np.array([(c.finish_s - c.first_token_s) / (c.output_tokens - 1) for c in calls
                     if c.output_tokens > 1 and not math.isnan(c.finish_s) and not math.isnan(c.first_token_s)])
    cost_usd = sum(e.price_per_hour for e in engines) * horizon_s / 3600.0
    queries = sum(e.prefix_query_tokens for e in engines)
    goodput = met / horizon_s
    per_tenant: dict[str, dict[str, float]] = {}
    for w in workflows:
        t = per_tenant.setdefault(w.tenant, {"n": 0, "met": 0})
        t["n"] += 1
        t["met"] += int(w.met_slo)
    result: dict[str, Any] = {
        "n_workflows": n,
        "n_calls": len(calls),
        "n_finished": len(finished),
        "n_failed": sum(1 for w in workflows if w.failed),
        "slo_attainment": met / n if n else math.nan,
        "goodput_qps": goodput,
        "throughput_qps": len(finished) / horizon_s,
        "latency_mean_s": float(lat.mean()) if len(lat) else math.nan,
        "latency_p50_s": _pct(lat, 50),
        "latency_p95_s": _pct(lat, 95),
        "latency_p99_s": _pct(lat, 99),
        "call_latency_p50_s": _pct(call_lat, 50),
        "call_latency_p95_s": _pct(call_lat, 95),
        "queueing_p50_s": _pct(queue, 50),
        "queueing_p95_s": _pct(queue, 95),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p95_s": _pct(ttft, 95),
        "tpot_p50_s": _pct(tpot, 50),
        "horizon_s": horizon_s,
        "cost_usd": cost_usd,
        "slo_goodput_per_usd": met / cost_usd if cost_usd > 0 else math.nan,
        "preemptions": sum(e.preemptions for e in engines),
        # hit tokens / prompt tokens over every admission, as vLLM's prefix_cache_hits / _queries
        "prefix_cache_hit_rate": (sum(e.prefix_hit_tokens for e in engines) / queries) if queries else 0.0,
        "prefill_tokens": sum(e.prefill_tokens for e in engines),
        "prefix_cache_evicted_blocks": sum(e.evicted_blocks for e in engines),
        "per_tenant": {k: {"n_workflows": v["n"], "slo_attainment": v["met"] / v["n"]} for k, v in per_tenant.items()},
        "engines": [
            {**asdict(e), "utilisation": min(1.0, e.busy_s / horizon_s) if horizon_s else 0.0,
             "prefix_cache_hit_rate": e.prefix_cache_hit_rate} for e in engines
        ],
        "sim_wall_s": sim_wall_s,
    }
    if extra:
        result.update(extra)
    return result


def records_from_simulator(sim: Any) -> tuple[list[WorkflowRecord], list[CallRecord], list[EngineRecord]]:
    wfs = [WorkflowRecord(w.workflow_id, w.tenant, w.arrival_time_s, w.finish_time_s, w.slo_s, w.n_calls, w.failed)
           for w in sim.workflows]
    engines = sim.engines
    calls = [CallRecord(c.call_id, c.workflow_id, c.step, engines[c.engine_id].name if c.engine_id >= 0 else "",
                        c.input_tokens, c.output_tokens, c.ready_time_s, c.dispatch_time_s, c.admit_time_s,
                        c.first_token_time_s, c.finish_time_s, c.preemptions, c.attempts)
             for c in sim.calls]
    span_end = max((w.finish_time_s for w in sim.workflows if not math.isnan(w.finish_time_s)), default=0.0)
    span_start = min((w.arrival_time_s for w in sim.workflows), default=0.0)
    horizon = max(span_end - span_start, 1e-9)
    ers = [EngineRecord(e.name, e.gpu, e.price_per_hour, e.busy_s,
                        e.kv_block_seconds / (e.total_blocks * horizon) if e.total_blocks else 0.0,
                        e.assigned_calls, e.preemptions,
                        e.prefix_cache.hit_tokens if e.prefix_cache is not None else 0, e.prompt_tokens_admitted,
                        e.prefill_tokens_computed, e.prefix_cache.evicted_blocks if e.prefix_cache is not None else 0)
           for e in engines]
    return wfs, calls, ers


def chrome_trace(sim: Any) -> dict[str, Any]:
    """Chrome/Perfetto trace: one track per engine with its iterations, and each call as a span."""
    events: list[dict[str, Any]] = []
    for e in sim.engines:
        events.append({"name": "process_name", "ph": "M", "pid": e.engine_id, "args": {"name": f"{e.name} ({e.gpu})"}})
        for start, dur, prefill, decodes in e.timeline or ():
            events.append({"name": "prefill" if prefill else "decode", "ph": "X", "pid": e.engine_id, "tid": 0,
                           "ts": start * 1e6, "dur": dur * 1e6, "args": {"prefill_tokens": prefill, "decodes": decodes}})
        cache = e.prefix_cache
        if cache is not None:
            end_s = max((s + d for s, d, _, _ in e.timeline or ()), default=0.0)
            events.append({"name": "prefix cache", "ph": "C", "pid": e.engine_id, "ts": end_s * 1e6,
                           "args": {"hit_rate": cache.hit_tokens / e.prompt_tokens_admitted if e.prompt_tokens_admitted
                                    else 0.0, "prefill_tokens": e.prefill_tokens_computed,
                                    "evicted_blocks": cache.evicted_blocks}})
    for c in sim.calls:
        if c.engine_id < 0 or math.isnan(c.finish_time_s):
            continue
        events.append({"name": c.step, "cat": "call", "ph": "X", "pid": c.engine_id, "tid": 1 + c.workflow_id % 64,
                       "ts": c.dispatch_time_s * 1e6, "dur": (c.finish_time_s - c.dispatch_time_s) * 1e6,
                       "args": {"workflow": c.workflow_id, "in": c.input_tokens, "out": c.output_tokens,
                                "cached": c.cached_tokens}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
