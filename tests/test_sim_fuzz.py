"""Hypothesis fuzz: random clusters and workloads keep the simulator's invariants under every
named policy (each draws one), with the prefix cache on and off."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.sim.config import ClusterConfig
from envs.sim.scenario import RunSpec, build_simulator
from envs.sim.workload import StageSpec, TokenDist, WorkflowTemplate
from heuristics import registry
from policies import load_policy
from tests.sim_checks import check_finished_run, instrument_kv

# engine types that fit their model (others are rejected with a clear error, tested elsewhere)
ENGINE_TYPES = [
    {"gpu": "A100-80G", "model": "Llama-3.1-8B", "weight_bits": 16},
    {"gpu": "L4", "model": "Llama-3.1-8B", "weight_bits": 16},
    {"gpu": "A10G", "model": "Llama-3.1-8B", "weight_bits": 8},
    {"gpu": "H100", "model": "Llama-3.1-8B", "weight_bits": 16, "tp": 2},
    {"gpu": "L40S", "model": "Llama-3.1-8B", "weight_bits": 4},
]

engine_strategy = st.builds(
    lambda base, count, seqs, budget, util, block: {**base, "count": count, "max_num_seqs": seqs,
                                                    "max_num_batched_tokens": budget, "gpu_memory_utilization": util,
                                                    "block_size_tokens": block},
    st.sampled_from(ENGINE_TYPES), st.integers(1, 3), st.sampled_from([2, 8, 64, 256]),
    st.sampled_from([2048, 4096, 8192]), st.sampled_from([0.8, 0.9, 0.95]), st.sampled_from([16, 128]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(engines=st.lists(engine_strategy, min_size=1, max_size=4), rate=st.floats(0.05, 5.0),
       seed=st.integers(0, 10_000), queries=st.integers(1, 25),
       trace=st.sampled_from(["chess_trace1", "chess_trace2", "chess_financial"]),
       policy=st.sampled_from(sorted(registry.NAMED)), prefix_cache=st.booleans())
def test_random_clusters_keep_invariants(engines, rate, seed, queries, trace, policy, prefix_cache) -> None:
    cluster = ClusterConfig.model_validate({"name": "fuzz", "engines": engines})
    spec = RunSpec(trace=trace, cluster=cluster, rate_qps=rate, slo_scale=2.0, seed=seed, queries=queries,
                   burstiness_cv=2.0 if seed % 2 else 1.0, prefix_cache=prefix_cache)
    _run_checked(spec, policy)


def _run_checked(spec: RunSpec, policy: str) -> None:
    p = load_policy(policy)
    p.reset()
    sim = build_simulator(spec, record_timeline=True, policy=p)
    problems = instrument_kv(sim)
    sim.run()
    assert not problems, problems[:3]
    check_finished_run(sim)


@pytest.mark.parametrize("policy", sorted(registry.NAMED))
def test_every_named_policy_keeps_invariants_under_overload(policy: str) -> None:
    """Each named policy at least once, on a mixed cluster with a KV-bound engine, bursty overload
    and the prefix cache on (the random draws above need not pick every one)."""
    cluster = ClusterConfig.model_validate({"name": "mixed", "engines": [
        {"gpu": "A100-80G", "model": "Llama-3.1-8B", "weight_bits": 16, "max_num_seqs": 8},
        {"gpu": "L4", "model": "Llama-3.1-8B", "weight_bits": 16, "gpu_memory_utilization": 0.8},
        {"gpu": "L40S", "model": "Llama-3.1-8B", "weight_bits": 4, "count": 2}]})
    _run_checked(RunSpec(trace="chess_trace1", cluster=cluster, rate_qps=3.0, slo_scale=2.0, seed=7, queries=20,
                         burstiness_cv=2.0, prefix_cache=True), policy)


@settings(max_examples=15, deadline=None)
@given(fanout=st.integers(1, 6), repeat=st.floats(0.0, 0.9), seed=st.integers(0, 1000))
def test_yaml_workflow_templates_sample_valid_workflows(fanout, repeat, seed) -> None:
    import numpy as np

    template = WorkflowTemplate(name="agent", stages=[
        StageSpec(step="plan", input_tokens=TokenDist(median=500, sigma=0.5), output_tokens=TokenDist(median=50)),
        StageSpec(step="act", fanout=fanout, input_tokens=TokenDist(median=2000, sigma=0.3),
                  output_tokens=TokenDist(median=100, sigma=0.3)),
        StageSpec(step="reflect", input_tokens=TokenDist(median=800), output_tokens=TokenDist(median=20)),
    ], loops=[{"start": 1, "end": 2, "repeat_prob": repeat, "max_repeats": 2}])
    for wf in template.sample(5, np.random.default_rng(seed)):
        steps = [stage[0].step for stage in wf.stages]
        assert steps[0] == "plan" and steps[-1] == "reflect"
        assert 3 <= len(wf.stages) <= 3 + 2 * 2
        assert all(len(stage) == fanout for stage in wf.stages if stage[0].step == "act")
