"""An upper bound on the SLO-goodput any policy can reach on a run: the headroom reference.

Each engine has a best batched prefill throughput (prompt tokens per second of an iteration that
fills `max_num_batched_tokens` with prefill, attending to at most one chunk of context) and a best
decode throughput (tokens per second of a decode iteration at the largest batch that fits: up to
`max_num_seqs` sequences of the workload's typical context in its KV cache), both from the engine
model's iteration model (`perf.iteration_s`). The workload needs, per query, its prefill work
(prompt tokens net of the prefix-cache hits a warm cache would give, `warm_cache_hit_tokens`, when
the cache is on) and its decode work (output tokens). Assuming every engine prefills and decodes
at those best rates *at the same time* (more than an engine can do), the cluster serves at most

    capacity_qps = min(sum_e prefill_e / prefill work per query, sum_e decode_e / decode work per query)

queries per second. A run's SLO-goodput is met queries over the span from the first arrival to the
last finish (`envs.sim.metrics.summarize`), so it is also at most the queries that can meet their
SLO at all over the shortest possible span (the arrivals' span plus the last query's solo time).
A query whose standalone latency on its fastest engine (warm cache hits granted) exceeds its SLO
can never be met and is counted out of both. Everything else about SLO feasibility (queueing,
batching slowdowns, stage dependencies) is ignored: this is an upper bound, not an estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from envs.sim.engine import Engine
from envs.sim.perf import solo_call_latency_s
from envs.sim.scenario import RunSpec, build_simulator, workload_for
from envs.sim.workload import WorkflowSpec


@dataclass(frozen=True)
class CapacityBound:
    rate_qps: float  # offered load: queries over the span of their arrivals
    capacity_qps: float  # the cluster's best throughput for this mix of queries
    prefill_capacity_qps: float
    decode_capacity_qps: float
    feasible_share: float  # queries whose solo latency on their fastest engine is within their SLO
    goodput_bound_qps: float  # the bound on SLO-goodput (same units as summarize's goodput_qps)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def call_hit_tokens(workflow: WorkflowSpec) -> list[list[int]]:
    """Per stage and call, the prompt tokens a warm prefix cache would serve (the rule of
    `warm_cache_hit_tokens`, call by call)."""
    seen: set[str] = set()
    out = []
    for stage in workflow.stages:
        hits_of_stage = []
        for call in stage:
            hits = 0
            for seg in call.segments:
                if seg.scope != "workflow" or seg.name in seen:
                    hits += seg.tokens
                else:
                    break
            hits_of_stage.append(hits)
        for call in stage:
            seen.update(seg.name for seg in call.segments if seg.scope == "workflow")
        out.append(hits_of_stage)
    return out


def engine_throughputs(engine: Engine, typical_prompt_tokens: float, typical_context_tokens: float) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) at the engine's best batch."""
    perf = engine.perf
    n = engine.max_num_batched_tokens
    ctx = min(n, max(1, int(typical_prompt_tokens)))
    prefill = n / perf.iteration_s(n, n, n * (ctx + 1) * 0.5, 0, 0)
    ctx_tokens = max(1, int(typical_context_tokens))
    batch = max(1, min(engine.max_num_seqs, engine.kv_capacity_tokens // ctx_tokens))
    decode = batch / perf.iteration_s(0, 0, 0.0, batch, batch * ctx_tokens)
    return prefill, decode


def solo_workflow_latency_s(engine: Engine, workflow: WorkflowSpec, hits: Sequence[Sequence[int]]) -> float:
    """The query alone on one engine: its stages in sequence, each as long as its slowest call
    (fan-out calls run side by side at best)."""
    total = 0.0
    for stage, stage_hits in zip(workflow.stages, hits):
        total += max(engine.model.solo_overhead_s + solo_call_latency_s(
            engine.perf, c.input_tokens, c.output_tokens, engine.max_num_batched_tokens, cached_tokens=h)
            for c, h in zip(stage, stage_hits))
    return total


def capacity_bound(spec: RunSpec) -> CapacityBound:
    """The capacity bound of one run (its workload, arrivals, cluster and SLO)."""
    workflows, arrivals = workload_for(spec)
    sim = build_simulator(spec)  # the engines and the SLO the run would have
    engines = sim.engines
    slo_s = sim.slo.base_slo_s * spec.slo_scale * min(t.slo_scale for t in spec.tenants)
    hits = [call_hit_tokens(w) if spec.prefix_cache else [[0] * len(s) for s in w.stages] for w in workflows]
    solo = np.array([[solo_workflow_latency_s(e, w, h) for e in engines] for w, h in zip(workflows, hits)]).min(axis=1)
    feasible = solo <= slo_s + 1e-9
    prompts = np.array([sum(c.input_tokens for s in w.stages for c in s) for w in workflows], dtype=float)
    hit_tokens = np.array([sum(sum(s) for s in h) for h in hits], dtype=float)
    outputs = np.array([sum(c.output_tokens for s in w.stages for c in s) for w in workflows], dtype=float)
    n_calls = sum(w.n_calls for w in workflows)
    typical_prompt = prompts.sum() / n_calls
    typical_context = typical_prompt + outputs.sum() / n_calls / 2.0
    rates = [engine_throughputs(e, typical_prompt, typical_context) for e in engines if e.healthy]
    prefill_rate = sum(p for p, _ in rates)
    decode_rate = sum(d for _, d in rates)
    pick = feasible if feasible.any() else np.ones_like(feasible)
    prefill_work = float((prompts - hit_tokens)[pick].mean())
    decode_work = float(outputs[pick].mean())
    prefill_qps = prefill_rate / max(prefill_work, 1.0)
    decode_qps = decode_rate / max(decode_work, 1.0)
    capacity = min(prefill_qps, decode_qps)
    span = float(arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    rate = (len(arrivals) - 1) / span if span > 0 else float("inf")
    shortest_horizon_s = span + float(solo[-1])
    goodput_bound = min(float(feasible.sum()) / shortest_horizon_s, capacity) if feasible.any() else 0.0
    return CapacityBound(rate, capacity, prefill_qps, decode_qps, float(feasible.mean()), goodput_bound)
