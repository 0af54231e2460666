"""The published peers (heuristics/peers.py) decide as their rules say, on hand-built states; the
attained and critical-path service the simulator keeps match a recomputation from its call records;
every peer runs under `agentsched simulate` on every shipped cluster."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from envs.sim.scenario import RunSpec, simulate
from envs.sim.view import WorkflowView
from heuristics import registry
from heuristics.peers import (
    AdaptiveThreadLevelAttainedService,
    ApplicationFIFO,
    AutellixLoadBalancer,
    HexagentRisk,
    JustitiaVirtualFinish,
    KairosMemoryDispatch,
    KairosPriority,
    ParrotPlacement,
    ProgramLevelAttainedService,
)
from policies import load_policy
from policies.heuristic import HeuristicPolicy
from tests.test_bench import run_main
from tests.test_heuristics import FakeCall, FakeCluster, FakeEngine, cluster

CLUSTERS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "envs" / "data" / "clusters").glob("*.yaml"))


@dataclass
class FakeWorkflow:
    workflow_id: int
    tenant: str = "default"
    arrival_time_s: float = 0.0
    slo_s: float = 100.0
    deadline_s: float = 100.0
    calls_done: int = 0
    expected_remaining_s: float = 0.0
    attained_service_s: float = 0.0
    critical_path_service_s: float = 0.0

    @property
    def done(self) -> bool:
        return False


def with_workflows(c: FakeCluster, *wfs: FakeWorkflow) -> FakeCluster:
    c._workflows = {w.workflow_id: w for w in wfs}
    c.workflows = list(wfs)
    return c


def two_engines() -> FakeCluster:
    return cluster(FakeEngine({"gen": 2.0}), FakeEngine({"gen": 4.0}))


def test_fake_workflow_satisfies_the_view():
    assert isinstance(FakeWorkflow(0), WorkflowView)


# ---- Autellix ---------------------------------------------------------------------------------------

def test_plas_admits_the_workflow_with_least_attained_service_first():
    c = with_workflows(two_engines(), FakeWorkflow(0, attained_service_s=50.0), FakeWorkflow(1, attained_service_s=1.0))
    order = ProgramLevelAttainedService()  # thresholds 2, 4, ..., 128 s; starvation ratio 2
    order.bind(c)
    heavy, light = FakeCall(workflow_id=0, ready_time_s=10.0), FakeCall(workflow_id=1, ready_time_s=10.0)
    e = c.engines[0]
    # 50 s is in the queue [32, 64): key = ready + 2 x 32; 1 s is in the top queue: key = ready
    assert order.key(heavy, e) == pytest.approx(10.0 + 2 * 32.0)
    assert order.key(light, e) == pytest.approx(10.0)
    # through the named policy: dispatch binds the view, the queue key reads it
    policy = HeuristicPolicy.named("autellix-plas")
    policy.dispatch(light, c)
    assert policy.queue_key(light, e) < policy.queue_key(heavy, e)


def test_plas_starvation_bound_promotes_a_call_that_waited_long_enough():
    c = with_workflows(two_engines(), FakeWorkflow(0, attained_service_s=5.0), FakeWorkflow(1))
    order = ProgramLevelAttainedService(starvation_ratio=3.0)
    order.bind(c)
    e = c.engines[0]
    old = FakeCall(workflow_id=0, ready_time_s=0.0)  # queue [4, 8): ahead of calls ready after 3 x 4 = 12 s
    assert order.key(old, e) < order.key(FakeCall(workflow_id=1, ready_time_s=12.5), e)
    assert order.key(old, e) > order.key(FakeCall(workflow_id=1, ready_time_s=11.5), e)
    # one queue only: plain FCFS whatever the service
    fcfs = ProgramLevelAttainedService(num_queues=1)
    fcfs.bind(c)
    assert fcfs.key(old, e) == 0.0


def test_atlas_orders_by_critical_path_not_total_service():
    # wf 0: a fan-out stage of 4 parallel 10 s calls (total 40 s, critical path 10 s);
    # wf 1: two sequential 10 s calls (total 20 s, critical path 20 s)
    c = with_workflows(two_engines(), FakeWorkflow(0, attained_service_s=40.0, critical_path_service_s=10.0),
                       FakeWorkflow(1, attained_service_s=20.0, critical_path_service_s=20.0))
    plas, atlas = ProgramLevelAttainedService(), AdaptiveThreadLevelAttainedService()
    plas.bind(c)
    atlas.bind(c)
    e = c.engines[0]
    a, b = FakeCall(workflow_id=0), FakeCall(workflow_id=1)
    assert plas.key(a, e) > plas.key(b, e)  # PLAS: wf 0 has more service
    assert atlas.key(a, e) < atlas.key(b, e)  # ATLAS: wf 0's critical path is shorter
    assert atlas.key(a, e) == pytest.approx(2 * 8.0) and atlas.key(b, e) == pytest.approx(2 * 16.0)


def test_simulator_keeps_attained_and_critical_path_service():
    """Recompute both from the call records: attained = sum of (finish - admission), critical path =
    sum over stages of the stage's longest call (stages run one after another)."""
    spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.05, slo_scale=3.0, seed=3, queries=12)
    _, sim = simulate(spec, load_policy("autellix-atlas"))
    fanned = 0
    for wf in sim.workflows:
        services = [[c.finish_time_s - c.admit_time_s for c in stage] for stage in wf.stages]
        assert wf.attained_service_s == pytest.approx(sum(sum(s) for s in services))
        assert wf.critical_path_service_s == pytest.approx(sum(max(s) for s in services))
        if any(len(s) > 1 for s in services):
            fanned += 1
            assert wf.critical_path_service_s < wf.attained_service_s
    assert fanned > 0  # the trace has fan-out stages, so the two measures differ


def test_autellix_long_calls_stick_to_the_workflow_engine_short_calls_go_to_the_least_loaded():
    c = two_engines()
    lb = AutellixLoadBalancer()  # 2048 prompt tokens
    c.engines[0].num_running = 3
    first = FakeCall(workflow_id=7, input_tokens=4096)
    assert lb.dispatch(first, c) == 1  # no history: least loaded
    c.engines[0].num_running, c.engines[1].num_running = 0, 9
    assert lb.dispatch(FakeCall(workflow_id=7, input_tokens=5000), c) == 1  # long: locality beats load
    assert lb.dispatch(FakeCall(workflow_id=8, input_tokens=5000), c) == 0  # another workflow: least loaded
    assert lb.dispatch(FakeCall(workflow_id=7, input_tokens=2048), c) == 0  # short (<= 2048): least loaded
    c.engines[0].healthy = False
    assert lb.dispatch(FakeCall(workflow_id=8, input_tokens=5000), c) == 1  # its engine is down
    lb.reset()
    c.engines[0].healthy = True
    c.engines[0].num_running = 20
    assert lb.dispatch(FakeCall(workflow_id=7, input_tokens=5000), c) == 1  # reset forgot the history


# ---- Kairos -----------------------------------------------------------------------------------------

def test_kairos_dispatch_prefers_engines_whose_free_kv_fits():
    c = cluster(FakeEngine({"gen": 1.0}, kv_usage=0.9), FakeEngine({"gen": 3.0}, kv_usage=0.5, num_running=10),
                FakeEngine({"gen": 3.0}, kv_usage=0.5, num_running=2))
    d = KairosMemoryDispatch()
    assert d.dispatch(FakeCall(), c) == 2  # most free KV; fewer calls break the tie; speed is not looked at
    c.engines[1].kv_usage = c.engines[2].kv_usage = 0.95
    assert d.dispatch(FakeCall(), c) == 0  # nothing has 20% free: the most free one
    assert KairosMemoryDispatch(min_free_kv=0.05).dispatch(FakeCall(), c) == 0


def test_kairos_priority_is_shortest_remaining_workflow_first():
    c = with_workflows(two_engines(), FakeWorkflow(0, expected_remaining_s=100.0), FakeWorkflow(1, expected_remaining_s=20.0))
    order = KairosPriority()
    order.bind(c)
    e = c.engines[1]  # T_e = 4 s
    assert order.key(FakeCall(workflow_id=0, ready_time_s=1.0), e) == pytest.approx(104.0)
    assert order.key(FakeCall(workflow_id=1, ready_time_s=50.0), e) == pytest.approx(24.0)
    aged = KairosPriority(age_weight=2.0)
    aged.bind(c)
    assert aged.key(FakeCall(workflow_id=0, ready_time_s=1.0), e) < aged.key(FakeCall(workflow_id=1, ready_time_s=50.0), e)


# ---- Parrot -----------------------------------------------------------------------------------------

def test_parrot_colocates_a_workflow_until_its_engine_queues_up():
    c = two_engines()
    d = ParrotPlacement(max_waiting=4)
    c.engines[0].num_running = 2
    assert d.dispatch(FakeCall(workflow_id=3), c) == 1
    c.engines[1].num_running, c.engines[1].num_waiting = 6, 4
    assert d.dispatch(FakeCall(workflow_id=3), c) == 1  # co-located although engine 0 is less loaded
    c.engines[1].num_waiting = 5
    assert d.dispatch(FakeCall(workflow_id=3), c) == 0  # its engine queues more than 4: least loaded


def test_parrot_latency_critical_calls_avoid_large_batches():
    # engine 0: 11 running (over the cap of 10), nothing queued; engine 1: 9 running, 5 queued
    c = cluster(FakeEngine({"gen": 2.0}, num_running=11), FakeEngine({"gen": 4.0}, num_running=9, num_waiting=5))
    d = ParrotPlacement(batch_cap=10, critical_slack=1.0)
    relaxed = FakeCall(workflow_id=1, deadline_s=100.0)
    critical = FakeCall(workflow_id=2, deadline_s=3.0)  # slack 3 - 0 - 2 = 1 s < 1 x T_best (2 s)
    assert d.dispatch(relaxed, c) == 0  # least loaded: 11 < 14 calls
    assert d.dispatch(critical, c) == 1  # only engines running fewer than 10 calls
    c.engines[1].num_running = 10
    assert d.dispatch(FakeCall(workflow_id=4, deadline_s=3.0), c) == 0  # none under the cap: all allowed


def test_app_fifo_orders_by_workflow_arrival():
    c = with_workflows(two_engines(), FakeWorkflow(0, arrival_time_s=5.0), FakeWorkflow(1, arrival_time_s=2.0))
    order = ApplicationFIFO()
    order.bind(c)
    e = c.engines[0]
    assert order.key(FakeCall(workflow_id=0, ready_time_s=100.0), e) == 5.0
    assert order.key(FakeCall(workflow_id=1, ready_time_s=300.0), e) == 2.0


# ---- Justitia ---------------------------------------------------------------------------------------

def test_justitia_virtual_finish_times_by_hand():
    c = with_workflows(two_engines(), FakeWorkflow(0, expected_remaining_s=100.0), FakeWorkflow(1, expected_remaining_s=100.0))
    c.workflows = c.workflows[:1]  # only wf 0 has arrived
    order = JustitiaVirtualFinish(engine_rate=1.0)
    order.bind(c)
    e = c.engines[0]
    # t=0: V = 0, cost = (T_e 2 + 100) x footprint / mean footprint (its own: 1)
    k0 = order.key(FakeCall(workflow_id=0, input_tokens=1000, output_tokens=100), e)
    assert k0 == pytest.approx(102.0)
    # t=10, two active workflows, two engines: V += 10 x 1 x 2 / 2 = 10; footprint 550 vs mean 825
    c.now_s = 10.0
    c.workflows = list(c._workflows.values())
    k1 = order.key(FakeCall(workflow_id=1, input_tokens=500, output_tokens=50), e)
    assert order.virtual_time == pytest.approx(10.0)
    assert k1 == pytest.approx(10.0 + 102.0 * 550.0 / 825.0)
    assert k1 < k0  # the smaller workflow finishes first under fair sharing
    # later calls of a workflow keep its virtual finish time
    c.now_s = 50.0
    assert order.key(FakeCall(workflow_id=0, input_tokens=9000, output_tokens=100), e) == pytest.approx(k0)


# ---- HexAGenT ---------------------------------------------------------------------------------------

def test_hexagent_risk_serves_the_least_projected_slack_first():
    c = with_workflows(two_engines(), FakeWorkflow(0, expected_remaining_s=250.0), FakeWorkflow(1, expected_remaining_s=50.0))
    order = HexagentRisk()
    order.bind(c)
    e = c.engines[0]  # T_e = 2 s
    at_risk = FakeCall(workflow_id=0, workflow_deadline_s=300.0)  # 300 - (2 + 250) = 48
    safe = FakeCall(workflow_id=1, workflow_deadline_s=200.0)  # 200 - (2 + 50) = 148
    assert order.key(at_risk, e) == pytest.approx(48.0)
    assert order.key(safe, e) == pytest.approx(148.0)
    assert order.key(at_risk, e) < order.key(safe, e)  # although its deadline is later


# ---- registry and CLI -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", registry.PEERS)
def test_peers_are_named_with_tunable_knobs(name):
    policy = load_policy(name)
    assert name in registry.describe()
    spaces = {**type(policy.dispatcher).search_space, **type(policy.local).search_space}
    assert spaces, f"{name} has nothing to tune"
    knobs = {**policy.knobs()["dispatch"], **policy.knobs()["local"]}
    assert set(spaces) <= set(knobs)


def test_unbound_peer_orders_fall_back_to_fcfs():
    call = FakeCall(ready_time_s=7.0)
    for order in (ProgramLevelAttainedService(), KairosPriority(), ApplicationFIFO(), JustitiaVirtualFinish()):
        assert order.key(call, FakeEngine({"gen": 1.0})) == 7.0


@pytest.mark.parametrize("cluster_name", CLUSTERS)
def test_every_peer_simulates_on_every_shipped_cluster(cluster_name, capsys, monkeypatch, tmp_path):
    for name in registry.PEERS:
        out = tmp_path / f"{name}.json"
        r = run_main(capsys, monkeypatch, "simulate", "--policy", name, "--cluster", cluster_name, "--queries", "10",
                     "--rate", "0.05", "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert out.exists()


def test_gateway_keeps_attained_and_critical_path_service(tmp_path):
    """The gateway's workflow state gets the same two fields the simulator keeps (a fan-out stage of
    two calls, then a call after it), so peers see the same view in both."""
    import asyncio

    import yaml

    from deploy.cluster import load_cluster
    from deploy.gateway.core import Gateway

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local-cpu.yaml").read_text())
    raw["workdir"] = str(tmp_path / "work")
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(raw))

    async def scenario():
        gw = Gateway(load_cluster(tmp_path / "cluster.yaml"), load_policy("autellix-atlas"))
        gw.state._t0 -= 100.0  # the gateway's clock starts at 0; let it have run for 100 s
        new = dict(workflow_key="q", tenant="t", input_tokens=10, output_tokens=5, stream=False, slo_s=100.0)
        a = gw.new_call(step="generate_candidate", **new)
        b = gw.new_call(step="generate_candidate", **new)  # same stage: both record critical path 0
        now = gw.state.now_s
        a.admit_time_s, b.admit_time_s = now - 5.0, now - 3.0
        gw.call_finished(a, ok=True)
        gw.call_finished(b, ok=True)
        wf = gw.state.workflow(a.workflow_id)
        after_stage = (wf.attained_service_s, wf.critical_path_service_s)
        c = gw.new_call(step="revise", **new)
        c.admit_time_s = gw.state.now_s - 2.0
        gw.call_finished(c, ok=True)
        return a, b, c, after_stage, wf

    a, b, c, (attained, critical), wf = asyncio.run(scenario())
    assert a.critical_path_at_ready_s == b.critical_path_at_ready_s == 0.0
    assert attained == pytest.approx(8.0, abs=0.05)  # 5 + 3
    assert critical == pytest.approx(5.0, abs=0.05)  # the longer of the two parallel calls
    assert c.critical_path_at_ready_s == pytest.approx(critical)
    assert wf.attained_service_s == pytest.approx(10.0, abs=0.05)
    assert wf.critical_path_service_s == pytest.approx(7.0, abs=0.05)
