"""Measured performance profiles replace the roofline for an engine."""

from __future__ import annotations

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
    spec = RunSpec(trace="chess_trace1", cluster=str(cluster_path), rate_qps=0.2, queries=5)
    base, base_sim = simulate(spec, load_policy("rr"))
    profile.request_overhead_s = 0.5
    profile.save(tmp_path / "profile.yaml")
    slow, slow_sim = simulate(spec, load_policy("rr"))
    wf0, wf1 = base_sim.workflows[0], slow_sim.workflows[0]
    on_profiled = sum(1 for c in slow_sim.calls if c.workflow_id == 0 and c.engine_id == 0)
    assert on_profiled > 0
    assert wf1.finish_time_s - wf1.arrival_time_s > wf0.finish_time_s - wf0.arrival_time_s + 0.5 * on_profiled * 0.9
    assert slow_sim.engines[0].expected_latency_s("revise") == pytest.approx(
        base_sim.engines[0].expected_latency_s("revise") + 0.5)


def test_call_engine_time_serialises_calls_admitted_together(tmp_path: Path) -> None:
    """k calls arriving at once on one engine: each adds call_engine_s to the iteration that admits
    it, so the last one (and the engine) finishes k * call_engine_s later; a solo call pays it once."""
    from envs.sim.cluster import ClusterSimulator
    from envs.sim.workload import CallSpec, WorkflowSpec

    cluster_path = _write(tmp_path)

    def finish_times(call_engine_s: float, k: int) -> list[float]:
        profile = PerfProfile.load(tmp_path / "profile.yaml")
        profile.call_engine_s = call_engine_s
        profile.save(tmp_path / "profile.yaml")
        specs = [WorkflowSpec(stages=(tuple(CallSpec("s", 16, 1) for _ in range(k)),))]
        sim = ClusterSimulator(load_cluster(cluster_path), specs, [0.0], slo_scale=1.0, step_tokens={"s": (16.0, 1.0)})
        while (call := sim.next_decision()) is not None:
            sim.dispatch(call, 0)
        return [c.finish_time_s for c in sim.calls]

    for k in (1, 4):
        plain, costly = finish_times(0.0, k), finish_times(0.003, k)
        assert max(costly) == pytest.approx(max(plain) + 0.003 * k)
        assert min(costly) >= min(plain) + 0.003 - 1e-12
