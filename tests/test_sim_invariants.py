"""Simulator invariants, determinism, fast-forward exactness and failures."""

from __future__ import annotations

import math

import pytest

from envs.sim.config import ClusterConfig
from envs.sim.scenario import FailureSpec, RunSpec, build_simulator, simulate
from policies import load_policy
from tests.sim_checks import check_finished_run, instrument_kv


def _run(spec: RunSpec, policy: str = "rr", max_segment: int | None = None):
    p = load_policy(policy)
    p.reset()
    sim = build_simulator(spec, queue_key=p.queue_key, record_timeline=True)
    for engine in sim.engines:
        engine.max_segment_iterations = max_segment
    problems = instrument_kv(sim)
    sim.run(p)
    assert not problems, problems[:3]
    return sim


@pytest.mark.parametrize("cluster,rate", [("paper", 0.05), ("paper", 0.4), ("mixed-16", 0.2), ("llama8b", 1.0)])
def test_invariants_hold(cluster: str, rate: float) -> None:
    sim = _run(RunSpec(trace="chess_trace2", cluster=cluster, rate_qps=rate, slo_scale=3.0, seed=3, queries=60))
    check_finished_run(sim)
    assert len(sim.calls) == sum(w.n_calls for w in sim.workflows)


def test_kv_pressure_preempts_and_still_finishes() -> None:
    """A small KV cache forces preemption by recompute; every call still finishes exactly once."""
    cluster = ClusterConfig.model_validate({"name": "tight", "engines": [
        {"gpu": "A6000", "model": "Llama-3.1-70B", "weight_bits": 4, "gpu_memory_utilization": 0.90, "count": 2}]})
    sim = _run(RunSpec(trace="chess_trace1", cluster=cluster, rate_qps=1.0, slo_scale=3.0, seed=1, queries=40))
    check_finished_run(sim)
    assert sum(e.preemptions for e in sim.engines) > 0


def test_same_seed_same_result() -> None:
    spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.1, slo_scale=3.0, seed=7, queries=120)
    a, _ = simulate(spec, load_policy("rr"))
    b, _ = simulate(spec, load_policy("rr"))
    a.pop("sim_wall_s"), b.pop("sim_wall_s")
    assert a == b
    c, _ = simulate(spec.model_copy(update={"seed": 8}), load_policy("rr"))
    c.pop("sim_wall_s")
    assert c != a


def test_fast_forward_matches_iteration_by_iteration() -> None:
    """Decode segments are closed-form sums of the same iterations: turning them off (one event
    per iteration) gives the same call finish times."""
    spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.1, slo_scale=3.0, seed=2, queries=15)
    fast = _run(spec)
    slow = _run(spec, max_segment=1)
    fast_finish = [c.finish_time_s for c in fast.calls]
    slow_finish = [c.finish_time_s for c in slow.calls]
    assert fast_finish == pytest.approx(slow_finish, rel=1e-9, abs=1e-6)
    assert sum(len(e.timeline) for e in slow.engines) > 5 * sum(len(e.timeline) for e in fast.engines)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_failed_engine_work_returns_to_dispatch(prefix_cache: bool) -> None:
    base = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.1, slo_scale=3.0, seed=0, queries=30,
                   prefix_cache=prefix_cache)
    # fail engine 0 in the middle of a long call it runs in the run without failures
    calls = [c for c in _run(base).calls if c.engine_id == 0 and c.finish_time_s - c.admit_time_s > 5.0]
    at_s = (calls[0].admit_time_s + calls[0].finish_time_s) / 2
    sim = _run(base.model_copy(update={"failures": [FailureSpec(engine=0, at_s=at_s, duration_s=120.0)]}))
    check_finished_run(sim)
    retried = [c for c in sim.calls if c.attempts > 1]
    assert retried, "the failed engine had work that should have been dispatched again"
    # nothing was placed on the engine while it was down
    for c in sim.calls:
        if c.engine_id == 0:
            assert not (at_s < c.dispatch_time_s < at_s + 120.0)


def test_all_engines_down_parks_calls_until_recovery() -> None:
    spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.1, slo_scale=3.0, seed=0, queries=10,
                   failures=[FailureSpec(engine=i, at_s=30.0, duration_s=100.0) for i in range(4)])
    sim = _run(spec)
    check_finished_run(sim)
    assert all(not (30.0 < c.dispatch_time_s < 130.0) for c in sim.calls)


def test_slo_rule_matches_the_paper() -> None:
    """Base SLO = sum over the standard workflow of per-step latency averaged over GPU types;
    a call's deadline is its proportional slice of the remaining budget."""
    sim = build_simulator(RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.1, slo_scale=2.0, queries=3))
    types = {}
    for e in sim.engines:
        types.setdefault(e.gpu, e)
    standard = sim.slo.standard
    expected = sum(sum(e.expected_latency_s(s) for e in types.values()) / len(types) for s in standard)
    assert sim.slo.base_slo_s == pytest.approx(expected)
    slo = sim.slo
    d = slo.call_deadline_s(10.0, 110.0, "generate_candidate", standard.index("generate_candidate"))
    e = slo.expected("generate_candidate")
    rest = sum(slo.expected(s) for s in standard[standard.index("generate_candidate") + 1:])
    assert d == pytest.approx(10.0 + 100.0 * e / (e + rest))
    # the last call of the standard workflow gets all that remains
    assert slo.call_deadline_s(10.0, 110.0, standard[-1], len(standard) - 1) == pytest.approx(110.0)
    # overdue workflows get no slack, not negative budgets
    assert slo.call_deadline_s(200.0, 110.0, "revise", 6) == pytest.approx(200.0)


def test_workflow_slo_and_goodput_accounting() -> None:
    spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.02, slo_scale=6.0, seed=0, queries=20)
    result, sim = simulate(spec, load_policy("rr"))
    met = sum(1 for w in sim.workflows if w.finish_time_s - w.arrival_time_s <= w.slo_s)
    assert result["slo_attainment"] == pytest.approx(met / 20)
    assert result["goodput_qps"] == pytest.approx(met / result["horizon_s"])
    assert result["cost_usd"] == pytest.approx(sum(e.price_per_hour for e in sim.engines) * result["horizon_s"] / 3600)
    for key in ("slo_attainment", "goodput_qps", "throughput_qps", "latency_p50_s", "latency_p95_s", "latency_p99_s",
                "n_workflows", "n_calls", "sim_wall_s", "cost_usd"):
        assert key in result and not (isinstance(result[key], float) and math.isnan(result[key]))
