"""The lookahead planner, the knob controller and the capacity bound."""

from __future__ import annotations

import logging

import pytest

from envs.sim.capacity import capacity_bound
from envs.sim.cells import Cell
from envs.sim.fork import fork
from envs.sim.scenario import build_simulator, simulate
from policies import load_policy
from policies.base import Policy, PolicyError
from policies.lookahead import LookaheadKnobsPolicy, LookaheadPolicy, first_open_workflow, rollout_score
from training.evaluate import evaluate, markdown_table

SMALL = Cell(cluster="paper", rate_qps=0.12, queries=30)
OVERLOADED = Cell(cluster="mixed-16", rate_qps=1.6, queries=60)


def numbers(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "sim_wall_s"}


def test_names_load_through_the_loader() -> None:
    policy = load_policy("lookahead:least-work@horizon_s=5,samples=1,top_k=3")
    assert isinstance(policy, LookaheadPolicy)
    assert (policy.base.name, policy.horizon_s, policy.samples, policy.top_k) == ("least-work", 5.0, 1, 3)
    assert isinstance(load_policy("lookahead"), LookaheadPolicy)
    assert load_policy("lookahead").spec()["arrivals"] == "model"
    assert load_policy("lookahead@arrivals=recent").spec()["arrivals"] == "recent"
    assert load_policy("lookahead").spec()["lengths"] == "median"
    assert load_policy("lookahead@lengths=sample").spec()["lengths"] == "sample"
    with pytest.raises(PolicyError, match="knob arrivals needs one of model, recent, known, got 'poisson'"):
        load_policy("lookahead@arrivals=poisson")
    assert isinstance(load_policy("lookahead-knobs:hexgen"), LookaheadKnobsPolicy)
    with pytest.raises(PolicyError, match="bad knob"):
        load_policy("lookahead@depth=3")
    with pytest.raises(PolicyError, match="no knob 'top_k'"):
        load_policy("lookahead-knobs@top_k=3")


def test_horizon_zero_is_the_base_policy() -> None:
    spec = SMALL.run_spec(2)
    base, base_sim = simulate(spec, load_policy("least-work+workflow"))
    planned, planned_sim = simulate(spec, load_policy("lookahead:least-work+workflow@horizon_s=0"))
    assert numbers(planned) == numbers(base)
    assert [c.engine_id for c in planned_sim.calls] == [c.engine_id for c in base_sim.calls]


def test_lookahead_plans_and_is_seeded() -> None:
    spec = Cell(cluster="paper", rate_qps=0.12, queries=8).run_spec(4)
    runs = []
    for _ in range(2):
        policy = load_policy("lookahead:least-work+workflow@horizon_s=10,samples=1,top_k=2")
        result, sim = simulate(spec, policy)
        runs.append((numbers(result), [c.engine_id for c in sim.calls]))
        assert policy.decision_ms and len(policy.decision_ms) <= sim.decisions
    assert runs[0] == runs[1]


def test_knob_controller_decides_every_interval(caplog) -> None:
    policy = load_policy("lookahead-knobs:least-work+workflow@interval_s=60,horizon_s=60,samples=1")
    with caplog.at_level(logging.INFO, logger="policies.lookahead"):
        result, sim = simulate(SMALL.run_spec(1), policy)
    assert len(policy.log) >= 2
    assert all(entry["predicted_gain"] >= 0 for entry in policy.log)  # the current setting is a candidate
    assert sum("lookahead-knobs t=" in r.message for r in caplog.records) == len(policy.log)
    assert result["n_finished"] == SMALL.queries


def test_knob_planning_is_pure_and_margin_keeps_the_base() -> None:
    """`plan_interval` (the hook the gateway runs in a worker thread) changes neither the simulator
    nor the knobs, and plans the same twice; with a margin no rollout can beat, the controller
    keeps the base's knobs and its run is the base policy's run."""
    spec = Cell(cluster="mixed-16", rate_qps=1.2, queries=40).run_spec(2)
    policy = load_policy("lookahead-knobs:least-work+workflow@interval_s=20,horizon_s=40,samples=1")
    assert isinstance(policy, LookaheadKnobsPolicy)
    sim = build_simulator(spec, policy=policy)
    while sim.now_s < 30.0:
        call = sim.next_decision(until_s=30.0)
        if call is None:
            break
        sim.dispatch(call, policy.dispatch(call, sim))
    knobs = dict(policy.base.dispatcher.get_knobs())
    before = (sim.now_s, sim.decisions, [len(e.waiting) + len(e.running) for e in sim.engines], len(policy.log))
    first, second = policy.plan_interval(sim), policy.plan_interval(sim)
    assert (first.knobs, first.predicted_objective) == (second.knobs, second.predicted_objective)
    assert first.current_knobs == knobs == policy.base.dispatcher.get_knobs()
    assert (sim.now_s, sim.decisions, [len(e.waiting) + len(e.running) for e in sim.engines], len(policy.log)) == before

    base_result, base_sim = simulate(spec, load_policy("least-work+workflow"))
    kept = load_policy("lookahead-knobs:least-work+workflow@interval_s=20,horizon_s=40,samples=1,margin=1000")
    kept_result, kept_sim = simulate(spec, kept)
    assert kept.log and not any(entry["changed"] for entry in kept.log)
    assert numbers(kept_result) == numbers(base_result)
    assert [c.engine_id for c in kept_sim.calls] == [c.engine_id for c in base_sim.calls]


def test_capacity_bound_holds_and_binds_under_overload() -> None:
    for cell in (SMALL, OVERLOADED):
        spec = cell.run_spec(0)
        bound = capacity_bound(spec)
        for name in ("rr", "least-work+workflow", "hexgen"):
            achieved = simulate(spec, load_policy(name))[0]["goodput_qps"]
            assert achieved <= bound.goodput_bound_qps + 1e-9, (cell.label, name)
    overloaded = capacity_bound(OVERLOADED.run_spec(0))
    assert overloaded.capacity_qps < overloaded.rate_qps
    assert overloaded.goodput_bound_qps < overloaded.rate_qps


def test_evaluate_reports_share_of_the_bound() -> None:
    results = evaluate("least-work+workflow", ["rr"], [OVERLOADED], [0, 1])
    cell = results["cells"][0]
    bound = cell["goodput_bound_qps"]["mean"]
    for p in cell["policies"].values():
        share = p["goodput_share_of_bound"]
        assert 0 <= share <= 1
        assert share == pytest.approx(p["metrics"]["goodput_qps"]["mean"] / bound)
    assert "share of bound" in markdown_table(results)


def test_lookahead_planners_keep_the_base_admission_in_decisions_and_rollouts() -> None:
    """`lookahead:B` and `lookahead-knobs:B` decide admission as B does, and their rollouts run
    B's admission too (ClusterSimulator.run): a rollout under an admission rule that defers every
    workflow defers the workflows it starts."""
    base = load_policy("training/configs/experts/least-work+admit-paper.yaml")
    spec = Cell(cluster="paper", rate_qps=0.6, queries=40).run_spec(3)
    _, ref = simulate(spec, load_policy("training/configs/experts/least-work+admit-paper.yaml"))
    assert any(wf.deferred for wf in ref.workflows)  # the rule defers at this load
    for planner in (LookaheadPolicy(base, horizon_s=0.0), LookaheadKnobsPolicy(base, interval_s=1e9)):
        _, sim = simulate(spec, planner)
        assert [wf.deferred for wf in sim.workflows] == [wf.deferred for wf in ref.workflows]

    class DeferEvery(Policy):
        name = "defer-every"

        def admit(self, call, cluster) -> bool:
            return False

        def dispatch(self, call, cluster) -> int:
            return 0

    sim = build_simulator(spec, policy=load_policy("rr"))
    call = sim.next_decision()
    sim.dispatch(call, 0)
    twin = fork(sim, 0, resample=False, policy=DeferEvery())
    rollout_score(twin, twin.now_s + 120.0, first_open_workflow(twin))
    started = [wf for wf in twin.workflows[1:] if wf.arrival_time_s <= twin.now_s]
    assert started and all(wf.deferred for wf in started)
