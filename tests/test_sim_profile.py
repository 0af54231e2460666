"""Measured performance profiles replace the roofline for an engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from envs.sim.config import load_cluster
from envs.sim.perf import PerfProfile, ProfileCoefficients, ProfileModel, solo_call_latency_s
from envs.sim.scenario import RunSpec, simulate
from policies import load_policy
from tests.test_sim_inputs import assert_one_line_error, run_cli


def _write(tmp_path: Path) -> Path:
    profile = PerfProfile(engine="cpu-tiny", iteration=ProfileCoefficients(
        base_s=0.01, prefill_token_s=2e-5, decode_seq_s=1e-3, context_token_s=1e-7, attn_pair_s=0.0),
        kv_capacity_tokens=40_000, max_num_seqs=16, max_num_batched_tokens=2048)
    profile.save(tmp_path / "profile.yaml")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("name: profiled\nengines:\n"
                       "  - {gpu: A100, model: Llama-3.1-8B, profile: profile.yaml}\n"
                       "  - {gpu: L4, model: Llama-3.1-8B}\n")
    return cluster


def test_profile_overrides_roofline(tmp_path: Path) -> None:
    cluster_path = _write(tmp_path)
    config = load_cluster(cluster_path)
    assert Path(config.engines[0].profile).is_absolute()  # resolved next to the cluster file
    result, sim = simulate(RunSpec(trace="chess_trace1", cluster=str(cluster_path), rate_qps=0.2, queries=10),
                           load_policy("rr"))
    profiled, roofline = sim.engines
    assert isinstance(profiled.perf, ProfileModel) and not isinstance(roofline.perf, ProfileModel)
    assert profiled.kv_capacity_tokens == 40_000 and profiled.max_num_seqs == 16
    # the linear model: one 1000-token prefill iteration, then 9 decode iterations of one sequence
    expected = (0.01 + 2e-5 * 1000 + 1e-7 * 1000) + sum(0.01 + 1e-3 + 1e-7 * (1001 + i) for i in range(9))
    assert solo_call_latency_s(profiled.perf, 1000, 10, 2048) == pytest.approx(expected)
    assert result["n_workflows"] == 10


def test_bad_profile_is_one_line(tmp_path: Path) -> None:
    cluster_path = _write(tmp_path)
    (tmp_path / "profile.yaml").write_text("kind: agentsched-perf-profile\niteration: {base_s: -1}\n")
    assert_one_line_error(run_cli("simulate", "--cluster", str(cluster_path), "--queries", "2"), "iteration")


def test_request_overhead_delays_the_workflow_not_the_engine(tmp_path: Path) -> None:
    cluster_path = _write(tmp_path)
    profile = PerfProfile.load(tmp_path / "profile.yaml")
    # a rate low enough that workflow 0 runs alone: the delay it sees is its own calls' overhead, not queueing
    spec = RunSpec(trace="chess_trace1", cluster=str(cluster_path), rate_qps=0.002, queries=5)
    base, base_sim = simulate(spec, load_policy("rr"))
    profile.request_overhead_s = 0.5
    profile.save(tmp_path / "profile.yaml")
    slow, slow_sim = simulate(spec, load_policy("rr"))
    wf0, wf1 = base_sim.workflows[0], slow_sim.workflows[0]
    # every stage whose calls all ran on the profiled engine ends 0.5 s later (calls of a fan-out
    # stage finish together, so they add the overhead once)
    on_profiled = sum(1 for stage in wf1.stages if all(c.engine_id == 0 for c in stage))
    assert on_profiled > 0
    assert wf1.finish_time_s - wf1.arrival_time_s > wf0.finish_time_s - wf0.arrival_time_s + 0.5 * on_profiled * 0.9
    assert slow_sim.engines[0].expected_latency_s("revise") == pytest.approx(
        base_sim.engines[0].expected_latency_s("revise") + 0.5)


def test_call_engine_time_serialises_calls_admitted_together(tmp_path: Path) -> None:
    """k calls arriving at once on one engine: each adds call_engine_s to the iteration that admits
    it, so the last one (and the engine) finishes k * call_engine_s later; a solo call pays it once."""
    def finish_times(call_engine_s: float, k: int) -> list[float]:
        def edit(profile: PerfProfile) -> None:
            profile.call_engine_s = call_engine_s
        return [c.finish_time_s for c in _one_stage_run(tmp_path, edit, k).calls]

    for k in (1, 4):
        plain, costly = finish_times(0.0, k), finish_times(0.003, k)
        assert max(costly) == pytest.approx(max(plain) + 0.003 * k)
        assert min(costly) >= min(plain) + 0.003 - 1e-12


def _one_stage_run(tmp_path: Path, profile_edit, k: int, failures=()) -> "object":
    from envs.sim.cluster import ClusterSimulator
    from envs.sim.workload import CallSpec, WorkflowSpec

    cluster_path = _write(tmp_path)
    profile = PerfProfile.load(tmp_path / "profile.yaml")
    profile_edit(profile)
    profile.save(tmp_path / "profile.yaml")
    specs = [WorkflowSpec(stages=(tuple(CallSpec("s", 16, 1) for _ in range(k)),))]
    sim = ClusterSimulator(load_cluster(cluster_path), specs, [0.0], slo_scale=1.0, step_tokens={"s": (16.0, 1.0)},
                           failures=failures)
    while (call := sim.next_decision()) is not None:
        sim.dispatch(call, 0 if sim.engines[0].healthy else 1)
    return sim


def test_api_server_time_lets_a_fan_out_reach_the_engine_one_at_a_time(tmp_path: Path) -> None:
    """k calls sent at once with call_frontend_s = f: the first reaches the scheduler after f and
    runs alone, its iteration stretched by f for each of the k - 1 others the API server takes in
    meanwhile; those run in the next iteration. What the vLLM CPU engines do (2-3 ms per call)."""
    f = 0.003

    def set_f(value: float):
        def edit(profile: PerfProfile) -> None:
            profile.call_frontend_s = value
        return edit

    solo_plain = _one_stage_run(tmp_path, set_f(0.0), 1).calls[0].finish_time_s
    solo = _one_stage_run(tmp_path, set_f(f), 1)
    assert solo.calls[0].finish_time_s == pytest.approx(solo_plain + f)
    assert solo.engines[0].expected_latency_s("s") == pytest.approx(_one_stage_run(
        tmp_path, set_f(0.0), 1).engines[0].expected_latency_s("s") + f)
    k = 4
    fan = _one_stage_run(tmp_path, set_f(f), k)
    first = min(c.finish_time_s for c in fan.calls)
    assert first == pytest.approx(solo_plain + k * f)
    admitted = sorted(c.admit_time_s for c in fan.calls)
    assert admitted[0] == pytest.approx(f) and all(t == pytest.approx(first) for t in admitted[1:])
    assert all(c.finish_time_s > first for c in fan.calls if c.admit_time_s > f)


def test_calls_inside_a_failing_engines_api_server_go_back_to_dispatch(tmp_path: Path) -> None:
    """A call the API server still holds when its engine fails is not lost: it is dispatched again."""
    from envs.sim.cluster import Failure

    def slow_frontend(profile: PerfProfile) -> None:
        profile.call_frontend_s = 1.0

    sim = _one_stage_run(tmp_path, slow_frontend, 3, failures=[Failure(engine=0, at_s=1.5, duration_s=10.0)])
    assert all(c.finish_time_s == c.finish_time_s for c in sim.calls)  # all finished (not nan)
    first, *held = sim.calls  # the API server passes one call per second: the 1st is done by 1.5 s
    assert first.attempts == 1 and first.engine_id == 0 and first.finish_time_s < 1.5
    # the 2nd and 3rd were still in the failing engine's API server: both are sent again at once
    assert all(c.attempts == 2 and c.engine_id == 1 and c.dispatch_time_s == pytest.approx(1.5) for c in held)
    assert sim.workflows[0].finish_time_s == sim.workflows[0].finish_time_s


def test_idle_wake_delays_the_first_iteration_after_idle_time(tmp_path: Path) -> None:
    """An engine that sat idle for t pays idle_wake_s x (1 - exp(-t / tau)) on its next iteration;
    a call that arrives while it is busy does not (the CPU engines' sleeping threads, see
    PerfProfile.idle_wake_s); with idle_wake_s = 0 nothing changes."""
    from envs.sim.cluster import ClusterSimulator
    from envs.sim.workload import CallSpec, WorkflowSpec

    wake_s, tau_s = 0.005, 0.02
    cluster_path = _write(tmp_path)

    def finishes(wake: float) -> list[float]:
        profile = PerfProfile.load(tmp_path / "profile.yaml")
        profile.idle_wake_s, profile.idle_wake_tau_s = wake, tau_s
        profile.save(tmp_path / "profile.yaml")
        specs = [WorkflowSpec(stages=((CallSpec("s", 16, 1),),)) for _ in range(3)]
        # 0.5 s: the engine idle since the start; 0.5001 s: it is busy with the first call;
        # 0.5 s + idle gap after both finished: it wakes again
        arrivals = [0.5, 0.5001, 0.6]
        sim = ClusterSimulator(load_cluster(cluster_path), specs, arrivals, slo_scale=1.0,
                               step_tokens={"s": (16.0, 1.0)})
        while (call := sim.next_decision()) is not None:
            sim.dispatch(call, 0)
        return [wf.finish_time_s for wf in sorted(sim.workflows, key=lambda w: w.arrival_time_s)]

    plain, woken = finishes(0.0), finishes(wake_s)
    first_wake = wake_s * -math.expm1(-0.5 / tau_s)
    assert woken[0] == pytest.approx(plain[0] + first_wake)
    assert woken[1] == pytest.approx(plain[1] + first_wake)  # queued behind the woken iteration, no wake of its own
    idle_s = 0.6 - woken[1]
    assert 0.0 < idle_s < 0.1
    assert woken[2] == pytest.approx(plain[2] + wake_s * -math.expm1(-idle_s / tau_s))
