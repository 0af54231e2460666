"""Forking a running simulation: seeded resampling, an untouched original, a clairvoyant fork that
reproduces the run, and the gateway's digital twin."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import yaml

from deploy.cluster import load_cluster
from deploy.gateway.core import Gateway
from deploy.gateway.state import build_cluster_state
from envs.sim.cells import Cell
from envs.sim.fork import conditional_output_tokens, fork, simulator_from_view, workload_generator
from envs.sim.metrics import records_from_simulator, summarize
from envs.sim.scenario import build_simulator, workload_for
from envs.sim.workload import PiecewiseArrivals, PoissonArrivals, ReplayArrivals, TraceGenerator
from policies import load_policy

CELL = Cell(cluster="paper", rate_qps=0.12, queries=40)


def metrics(sim) -> dict:
    out = summarize(*records_from_simulator(sim), sim_wall_s=0.0)
    return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def advanced(decisions: int = 60, seed: int = 3):
    policy = load_policy("least-work+workflow")
    sim = build_simulator(CELL.run_spec(seed), policy=policy)
    for _ in range(decisions):
        call = sim.next_decision()
        sim.dispatch(call, policy.dispatch(call, sim))
    assert any(e.running for e in sim.engines), "the fork point must have calls in flight"
    return sim


def state(sim) -> tuple:
    return (sim.now_s, sim._next_arrival, tuple(sim._arrivals.tolist()),
            tuple(c.output_tokens for c in sim.calls), tuple((c.generated, c.kv_tokens) for c in sim.calls),
            tuple((e.version, e.busy_until_s, len(e.waiting), len(e.running), e.free_blocks) for e in sim.engines),
            len(sim._events), sim.decisions)


def test_fork_leaves_the_original_untouched() -> None:
    sim = advanced()
    before = state(sim)
    twin = fork(sim, seed=1)
    twin.run()
    assert twin.done and not sim.done
    assert state(sim) == before


def test_resampling_is_deterministic_by_seed_and_changes_the_unknowns() -> None:
    sim = advanced()
    a, b, c = fork(sim, 5), fork(sim, 5), fork(sim, 6)
    assert state(a) == state(b)
    assert [x.output_tokens for x in a.calls] != [x.output_tokens for x in sim.calls]
    assert state(a) != state(c)
    # redrawn lengths respect what was generated; future arrivals are after now
    for call in a.calls:
        assert call.output_tokens >= call.generated + (0 if call.generated >= sim.calls[call.call_id].output_tokens else 1)
    assert (a._arrivals[a._next_arrival:] > sim.now_s).all()
    a.run()
    b.run()
    assert metrics(a) == metrics(b)


def test_clairvoyant_fork_reproduces_the_run() -> None:
    sim = advanced()
    twin = fork(sim, seed=0, resample=False)
    sim.run()
    twin.run()
    assert metrics(twin) == metrics(sim)
    assert [c.finish_time_s for c in twin.calls] == [c.finish_time_s for c in sim.calls]


def fields(obj) -> dict:
    """Every attribute of a slotted (pure) or mypyc-compiled object, as its pickle state has them."""
    got = obj.__getstate__()
    return got[1] if isinstance(got, tuple) else got


def values(obj, skip: str) -> dict[str, str]:
    """The fields but `skip`, by repr (so that NaN equals NaN)."""
    return {name: repr(value) for name, value in fields(obj).items() if name != skip}


def test_field_by_field_copies_keep_every_field_and_the_cache_nodes_of_the_copy() -> None:
    """Calls, workflows and cache nodes copy themselves for a fork (a generic deep copy was most of
    its cost): every field equal, and a call's cache nodes are the copied cache's, not the original's."""
    sim = advanced()
    twin = fork(sim, seed=0, resample=False)
    admitted = [c for c in sim.calls if c.cache_nodes]
    assert admitted, "the fork point must have admitted calls holding cache nodes"
    for original, copied in zip(sim.calls, twin.calls):
        assert copied is not original or sim.workflows[original.workflow_id].done
        assert values(copied, "cache_nodes") == values(original, "cache_nodes")
    twin_nodes = {id(n) for e in twin.engines for n in e.prefix_cache.nodes.values()}
    sim_nodes = {id(n) for e in sim.engines for n in e.prefix_cache.nodes.values()}
    for call in admitted:
        copied = twin.calls[call.call_id]
        assert [fields(n) for n in copied.cache_nodes] == [fields(n) for n in call.cache_nodes]
        assert all(id(n) in twin_nodes and id(n) not in sim_nodes for n in copied.cache_nodes)
    for engine, copied_engine in zip(sim.engines, twin.engines):
        cache, copied = engine.prefix_cache, copied_engine.prefix_cache
        assert copied is not cache
        assert {k: v for k, v in fields(copied).items() if k not in ("nodes", "_lru")} == \
            {k: v for k, v in fields(cache).items() if k not in ("nodes", "_lru")}
        assert [(k, fields(n)) for k, n in copied.nodes.items()] == [(k, fields(n)) for k, n in cache.nodes.items()]
        assert list(copied._lru) == list(cache._lru)
        assert all(node is copied.nodes[key] for key, node in copied._lru.items())
    for original, copied in zip(sim.workflows, twin.workflows):
        assert values(copied, "stages") == values(original, "stages")
        assert [[c.call_id for c in st] for st in copied.stages] == [[c.call_id for c in st] for st in original.stages]
        assert all(c is twin.calls[c.call_id] for st in copied.stages for c in st)


def test_a_fork_to_a_horizon_draws_only_the_arrivals_before_it() -> None:
    sim = advanced()
    until_s = sim.now_s + 30.0
    bounded, full = fork(sim, 4, until_s=until_s), fork(sim, 4)
    first = sim._next_arrival
    arrivals = bounded._arrivals[first:]
    assert 0 < len(arrivals) < len(full._arrivals[first:])
    assert (arrivals <= until_s).all() and full._arrivals[first + len(arrivals)] > until_s
    assert arrivals.tolist() == full._arrivals[first:first + len(arrivals)].tolist()  # the same draws
    assert len(bounded._specs) == first + len(arrivals) == len(bounded._tenant_of)
    bounded.run(until_s=until_s)
    assert len(bounded.workflows) == first + len(arrivals)


def test_conditional_outputs_follow_the_fit() -> None:
    """Draws with no progress look like the step's outputs; a lower bound is always kept."""
    specs, _ = workload_for(CELL.run_spec(0))
    gen = workload_generator(specs)
    step = "generate_candidate"
    rng = np.random.default_rng(0)
    ins = np.full(2000, 9000.0)
    free = conditional_output_tokens(gen, step, ins, np.ones(2000), rng)
    bound = conditional_output_tokens(gen, step, ins, np.full(2000, 600.0), rng)
    assert (bound >= 600).all()
    assert np.median(bound) > np.median(free)
    observed = [c.output_tokens for w in specs for s in w.stages for c in s if c.step == step]
    assert 0.5 < np.median(free) / np.median(observed) < 2.0
    median = conditional_output_tokens(gen, step, ins[:3], np.array([1.0, 1.0, 600.0]), rng, median=True)
    assert median[0] == median[1] == pytest.approx(np.median(free), rel=0.05)  # the draws' median, no noise
    assert median[2] == pytest.approx(np.median(bound), rel=0.05) and median[2] >= 600


PAPER_DEPLOY = {
    "name": "paper-live",
    "engines": [
        {"name": "a100", "url": "http://127.0.0.1:1", "gpu": "A100-80G", "architecture": "Llama-3.1-70B",
         "weight_bits": 4, "price_per_hour": 1.8},
        {"name": "l40s", "url": "http://127.0.0.1:2", "gpu": "L40S", "architecture": "Llama-3.1-70B",
         "weight_bits": 4, "price_per_hour": 1.1},
    ],
    "gateway": {"slo_scale": 3.0, "token_scale": 1.0},
}


def test_simulator_from_gateway_state_runs(tmp_path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(PAPER_DEPLOY))
    cluster = load_cluster(path)
    now = [50.0]

    async def live():
        gw = Gateway(cluster, load_policy("rr"))
        gw.state = build_cluster_state(cluster, lambda: now[0])
        calls = []
        for w, (step, n_in, n_out, fan, engine) in enumerate([("Information Retriever", 300, 300, 1, 0),
                                                             ("generate_candidate", 9000, 2048, 2, 1)]):
            for _ in range(fan):
                call = gw.new_call(workflow_key=f"q{w}", step=step, tenant="default", input_tokens=n_in,
                                   output_tokens=n_out, stream=False, stage_index=0, fanout=fan)
                gw._enqueue(call, gw.state.engines[engine])
                calls.append(call)
        return gw, calls

    gw, calls = asyncio.run(live())
    now[0] += 5.0
    specs, _ = workload_for(CELL.run_spec(0))
    twin = simulator_from_view(gw.state, calls, cluster.engine_configs(), slo_scale=3.0, seed=1,
                               generator=TraceGenerator.fit(specs), future_queries=3, policy=load_policy("least-work"),
                               slo=gw.state.slo)
    assert twin.now_s == pytest.approx(gw.state.now_s)
    assert [e.model for e in twin.engines] == [e.model for e in gw.state.engines]
    assert [len(e.waiting) + len(e.running) for e in twin.engines] == [1, 2]
    assert twin.workflows[1].deadline_s == gw.state.workflow(calls[1].workflow_id).deadline_s
    twin.run()
    assert twin.done and twin.finished_workflows == 5
    again = simulator_from_view(gw.state, calls, cluster.engine_configs(), slo_scale=3.0, seed=1,
                                generator=TraceGenerator.fit(specs), future_queries=3,
                                policy=load_policy("least-work"), slo=gw.state.slo)
    again.run()
    assert metrics(again) == metrics(twin)


def test_piecewise_forecast_from_a_point_follows_the_rate_ahead() -> None:
    burst = Cell(cluster="paper", rate_qps=0.12, load="burst", queries=60).arrivals()
    assert isinstance(burst, PiecewiseArrivals)
    low, high = burst.segments[0], burst.segments[1]  # 0.5x until a third of the span, then 3x
    assert burst.times_after(0.0, 50, np.random.default_rng(1)).tolist() == burst.times(50, np.random.default_rng(1)).tolist()
    start_s = low.duration_s - 20.0  # 20 s before the burst starts
    rng = np.random.default_rng(2)
    draws = [burst.times_after(start_s, 80, rng) for _ in range(300)]
    assert all((d > start_s).all() and (np.diff(d) >= 0).all() for d in draws)
    before = np.mean([np.sum(d < low.duration_s) for d in draws])
    inside = np.mean([np.sum((d >= low.duration_s) & (d < low.duration_s + high.duration_s)) for d in draws])
    assert before == pytest.approx(low.rate_qps * 20.0, rel=0.15)
    assert inside == pytest.approx(high.rate_qps * high.duration_s, rel=0.1)
    poisson = PoissonArrivals(rate_qps=0.5)
    assert (poisson.times_after(100.0, 5, np.random.default_rng(3)) - 100.0).tolist() == pytest.approx(
        poisson.times(5, np.random.default_rng(3)).tolist())
    replay = ReplayArrivals(timestamps_s=[0.0, 10.0, 20.0, 30.0, 40.0])  # 0.1 q/s; its data, not a forecast
    gaps = np.diff(replay.times_after(40.0, 4000, np.random.default_rng(4)), prepend=40.0)
    assert (gaps > 0).all() and gaps.mean() == pytest.approx(10.0, rel=0.05)


def test_a_fork_draws_future_arrivals_from_the_runs_arrival_model() -> None:
    cell = Cell(cluster="paper", rate_qps=0.12, load="burst", queries=60)
    sim = build_simulator(cell.run_spec(3), policy=load_policy("least-work+workflow"))
    assert sim.arrival_model == cell.arrivals()
    burst = cell.arrivals().segments
    start_s, end_s = burst[0].duration_s, burst[0].duration_s + burst[1].duration_s
    sim.run(until_s=start_s - 40.0)  # in the quiet phase: the recent rate reads half the mean

    def in_burst(arrivals: str) -> float:
        counts = []
        for seed in range(20):
            twin = fork(sim, seed, arrivals=arrivals)
            future = twin._arrivals[sim._next_arrival:]
            counts.append(np.sum((future >= start_s) & (future < end_s)))
        return float(np.mean(counts))

    forecast, recent = in_burst("model"), in_burst("recent")
    assert forecast == pytest.approx(burst[1].rate_qps * burst[1].duration_s, rel=0.2)
    assert forecast > 3 * recent


def test_a_fork_with_known_arrivals_redraws_only_the_lengths() -> None:
    sim = advanced()
    known = fork(sim, 5, arrivals="known")
    assert known._arrivals.tolist() == sim._arrivals.tolist() and known._specs == sim._specs
    assert [c.output_tokens for c in known.calls] == [c.output_tokens for c in fork(sim, 5).calls]
    assert [c.output_tokens for c in known.calls] != [c.output_tokens for c in sim.calls]
