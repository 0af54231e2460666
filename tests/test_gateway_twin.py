"""The gateway's digital twin and the `lookahead-knobs` controller on it (no engines).

A gateway over the local CPU cluster's engine models (their calibrated profiles) on a test clock,
with calls in flight registered the way the HTTP layer does (`new_call` + `_enqueue`): the twin
built from that live state, a planning decision on it that is seeded, its adoption and its log
line and metrics, the control loop planning without holding up the event loop, and the names,
policy files and bad values `agentsched serve --policy` takes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentsched.cli import main
from deploy.cluster import load_cluster
from deploy.gateway.core import Gateway
from deploy.gateway.state import build_cluster_state
from envs.sim.errors import UserError
from policies import load_policy
from policies.base import PolicyError
from policies.lookahead import LookaheadKnobsPolicy

ROOT = Path(__file__).resolve().parent.parent
POLICY = "lookahead-knobs:least-work+workflow@interval_s=5,horizon_s=60,samples=2,seed={seed}"


@pytest.fixture(scope="module")
def cpu_cluster(tmp_path_factory):
    """deploy/clusters/local-cpu.yaml without launching anything (unreachable urls)."""
    data = yaml.safe_load((ROOT / "deploy" / "clusters" / "local-cpu.yaml").read_text())
    for i, engine in enumerate(data["engines"]):
        engine.pop("launch")
        engine["url"] = f"http://127.0.0.1:{9 + i}"
        engine["profile"] = str(ROOT / engine["profile"])
    path = tmp_path_factory.mktemp("twin") / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_cluster(path)


def loaded_gateway(cluster, policy, workflows: int = 12) -> tuple[Gateway, list[float]]:
    """A gateway whose clock is a list entry: `workflows` two-call stages in flight, arriving every
    2 s, two of three queued on the slow engine (a skewed placement the knobs can act on)."""
    now = [100.0]
    gw = Gateway(cluster, policy)
    gw.state = build_cluster_state(cluster, lambda: now[0])

    async def place() -> None:
        for w in range(workflows):
            now[0] += 2.0
            for _ in range(2):
                call = gw.new_call(workflow_key=f"q{w}", step="generate_candidate", tenant="default", input_tokens=450,
                                   output_tokens=100, stream=False, stage_index=2, fanout=2)
                gw._enqueue(call, gw.state.engines[1 if w % 3 else 0])

    asyncio.run(place())
    return gw, now


def test_twin_is_the_live_state(cpu_cluster) -> None:
    gw, _ = loaded_gateway(cpu_cluster, load_policy(POLICY.format(seed=0)))
    twin = gw.build_twin(seed=1)
    assert twin.now_s == pytest.approx(gw.state.now_s)
    placed = [sum(1 for c in gw.calls_in_flight.values() if c.engine_id == e.engine_id) for e in gw.state.engines]
    assert placed == [8, 16]
    in_twin = [sum(1 for c in twin.calls if c.engine_id == e.engine_id) for e in twin.engines]
    assert in_twin == placed
    assert [wf.deadline_s for wf in twin.workflows[:12]] == [wf.deadline_s for wf in gw.state.open_workflows.values()]
    # forks draw future arrivals at the live rate, not at the twin's burst of 12 arrivals at once
    assert twin.recent_arrival_rate_qps == pytest.approx(gw.state.recent_arrival_rate_qps, rel=0.1)
    # the twin holds a policy reference but never ticks it (building it planned nothing)
    assert gw.policy.log == []
    idle, idle_now = loaded_gateway(cpu_cluster, load_policy(POLICY.format(seed=0)), workflows=0)
    idle_now[0] += 30.0
    assert idle.build_twin(seed=1).now_s == pytest.approx(30.0)  # on the view's clock, with nothing in flight too


def test_twin_decision_is_seeded_and_moves_knobs(cpu_cluster) -> None:
    decisions = []
    for seed in (0, 0, 1):
        gw, _ = loaded_gateway(cpu_cluster, load_policy(POLICY.format(seed=seed)))
        decisions.append(gw.policy.plan_interval(gw.build_twin(seed=3)))
    first, again, other = decisions
    assert (first.knobs, first.predicted_objective, first.current_objective) == \
        (again.knobs, again.predicted_objective, again.current_objective)
    assert first.changed and first.knobs != first.current_knobs
    assert first.predicted_objective > first.current_objective
    assert (other.predicted_objective, other.current_objective) != (first.predicted_objective, first.current_objective)


def test_control_interval_adopts_logs_and_exports(cpu_cluster, caplog) -> None:
    policy = load_policy(POLICY.format(seed=0))
    assert isinstance(policy, LookaheadKnobsPolicy)
    gw, now = loaded_gateway(cpu_cluster, policy)
    before = dict(policy.base.dispatcher.get_knobs())
    with caplog.at_level(logging.INFO, logger="agentsched.gateway"):
        decision = asyncio.run(gw._plan_on_twin(tick=3))
    assert decision is not None and decision.changed
    assert policy.base.dispatcher.get_knobs() == {**before, **decision.knobs} != before
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("twin decision ")]
    assert len(lines) == 1
    record = json.loads(lines[0].removeprefix("twin decision "))
    assert record["knobs"] == decision.knobs and record["current_knobs"] == before
    # the adopted setting is predicted better: more SLO-met workflows, or as many and less lateness
    assert decision.predicted_objective > decision.current_objective
    assert record["predicted_goodput_qps"] >= record["current_goodput_qps"] and record["calls_in_flight"] == 24
    assert record["decision_s"] >= record["plan_s"] > 0
    assert gw.info()["twin_decisions"] == [record]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(generate_latest(gw.metrics.registry).decode())
               for s in family.samples}
    assert samples[("agentsched_twin_decisions_total", (("changed", "true"),))] == 1.0
    assert samples[("agentsched_twin_predicted_goodput_qps", (("setting", "chosen"),))] == \
        pytest.approx(decision.predicted_goodput_qps)
    assert samples[("agentsched_twin_predicted_goodput_qps", (("setting", "current"),))] == \
        pytest.approx(decision.current_goodput_qps)
    assert samples[("agentsched_twin_decision_seconds", ())] >= decision.decision_s
    for knob, value in decision.knobs.items():
        assert samples[("agentsched_policy_knob", (("knob", knob),))] == value


def test_control_loop_plans_without_blocking_the_event_loop(cpu_cluster) -> None:
    """The loop keeps serving (a 5 ms heartbeat) while a plan many heartbeats long runs."""
    heavy = POLICY.format(seed=0).replace("interval_s=5", "interval_s=0.05").replace("samples=2", "samples=4")
    gw, _ = loaded_gateway(cpu_cluster, load_policy(heavy))
    # a gateway process holds only its own objects; this one also holds what earlier tests left,
    # and a full pass of the cyclic collector over that heap (in whichever thread allocates) holds
    # the GIL for a quarter of a second: set it aside as a served process would
    gc.collect()
    gc.freeze()

    async def run() -> float:
        gaps, last = [], time.perf_counter()
        task = asyncio.create_task(gw._control_loop())
        while not gw.twin_decisions:
            await asyncio.sleep(0.005)
            t = time.perf_counter()
            gaps.append(t - last)
            last = t
        task.cancel()
        return max(gaps)

    try:
        worst_gap_s = asyncio.run(run())
    finally:
        gc.unfreeze()
    plan_s = gw.twin_decisions[0]["plan_s"]
    # the plan must outlast a few heartbeats for the check to mean anything (0.4 s here, compiled;
    # a faster machine shortens it, and the bound below scales with it)
    assert gw.interval_calls == 1 and plan_s > 0.05
    assert worst_gap_s < plan_s / 3, (worst_gap_s, plan_s)


def test_serve_names_files_and_bad_values(tmp_path, cpu_cluster, capsys, monkeypatch) -> None:
    policy = load_policy("lookahead-knobs:least-work+workflow@interval_s=20,margin=0.1")
    assert isinstance(policy, LookaheadKnobsPolicy) and policy.plans_on_twin
    assert (policy.interval_s, policy.margin) == (20.0, 0.1)
    # a policy file, e.g. the spec of a running controller (its adopted knobs as the start)
    spec = {**policy.spec(), "knobs": {"backlog_weight": 0.5}}
    path = tmp_path / "lk.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = load_policy(path)
    assert isinstance(loaded, LookaheadKnobsPolicy)
    assert (loaded.interval_s, loaded.base.dispatcher.backlog_weight) == (20.0, 0.5)
    loaded.base.dispatcher.backlog_weight = 0.9
    loaded.reset()  # reset goes back to the file's knobs
    assert loaded.base.dispatcher.backlog_weight == 0.5
    for bad, needle in (("lookahead-knobs@interval_s=-5", "interval_s must be > 0"),
                        ("lookahead-knobs@interval_s=soon", "knob interval_s needs a number"),
                        ("lookahead-knobs@clairvoyant=maybe", "needs true or false"),
                        ("lookahead-knobs@top_k=2", "no knob 'top_k'")):
        with pytest.raises(PolicyError, match=needle):
            load_policy(bad)
    for file_spec, needle in (({"kind": "lookahead-knobs", "horizon_s": 0}, "horizon_s"),
                              ({"kind": "lookahead-knobs", "knobs": {"alpha": 0.5}}, "no knob 'alpha'"),
                              ({"kind": "lookahead-knobs", "knobs": {"kv_weight": -1}}, "kv_weight"),
                              ({"kind": "lookahead-knobs", "depth": 3}, "depth")):
        path.write_text(yaml.safe_dump(file_spec))
        with pytest.raises(PolicyError, match=needle):
            load_policy(path)
    # through the CLI: one line, exit 2, before anything is served
    monkeypatch.setattr("deploy.gateway.server.run_gateway", lambda *a, **k: pytest.fail("the gateway started"))
    monkeypatch.setattr(sys, "argv", ["agentsched", "serve", "--cluster", str(ROOT / "deploy/clusters/local-cpu.yaml"),
                                      "--policy", "lookahead-knobs:least-work+workflow@interval_s=0"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "interval_s must be > 0" in err[0], err


def test_twin_needs_simulable_engines(tmp_path) -> None:
    """An engine known only by a latency table cannot be simulated: refused at start-up, one line."""
    data = {"name": "tables", "engines": [{"name": "a", "url": "http://127.0.0.1:9", "gpu": "A100"},
                                          {"name": "b", "url": "http://127.0.0.1:10", "gpu": "L40"}]}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    cluster = load_cluster(path)
    Gateway(cluster, load_policy("least-work+workflow"))  # a policy that needs no twin is fine
    with pytest.raises(UserError, match="engine 'a': policy lookahead-knobs.* needs an iteration model"):
        Gateway(cluster, load_policy("lookahead-knobs"))


@pytest.mark.engines
def test_lookahead_knobs_decides_in_front_of_live_engines(live_cluster, tmp_path, caplog) -> None:
    """A small replay through a gateway running `lookahead-knobs` in front of the two vLLM CPU
    engines: it takes decisions on the twin of the live state (calls in flight) and logs each."""
    from deploy.replay import ReplayConfig, replay
    from tests.deploy_fixtures import thread_gateway

    # 12 queries at 2 q/s keep one or two workflows open most of the time (each takes ~0.6 s on these
    # engines), so some of the ~6 decisions see calls in flight whatever the machine's speed
    policy = load_policy("lookahead-knobs:least-work+workflow@interval_s=1,horizon_s=30,samples=1")
    with caplog.at_level(logging.INFO, logger="agentsched.gateway"):
        with thread_gateway(live_cluster.cluster(tmp_path), policy) as gw:
            result, _ = replay(ReplayConfig(gateway=gw.url, trace="chess_trace1", rate_qps=2.0, slo_scale=3.0,
                                            token_scale=0.05, queries=12, seed=2))
            info = gw.gateway.info()
    assert result["n_finished"] == 12 and result["n_failed"] == 0
    decisions = info["twin_decisions"]
    assert len(decisions) >= 2 and info["interval_calls"] >= len(decisions)
    assert any(d["calls_in_flight"] > 0 and d["open_workflows"] > 0 for d in decisions), decisions
    assert all(d["plan_s"] > 0 and set(d["knobs"]) == {"backlog_weight", "queue_weight", "kv_weight"} for d in decisions)
    logged = [json.loads(r.getMessage().removeprefix("twin decision ")) for r in caplog.records
              if r.getMessage().startswith("twin decision ")]
    assert logged[:len(decisions)] == decisions[:len(logged)] and len(logged) >= len(decisions)
    assert policy.base.dispatcher.get_knobs() == decisions[-1]["knobs"] or len(logged) > len(decisions)
