"""The simulator and the gateway show policies the same world.

One cluster file is built twice: as the simulator's `ClusterSimulator` (from the engines'
`EngineSpec.engine_config()`) and as the gateway's live `ClusterState` (no engine contacted). The
same workflows arrive and their first stages are placed on the same engines; the simulator runs
its engines for a moment, and the gateway is told what a vLLM engine's /metrics would say at that
moment (a scrape). Then every view field, every Dispatch-v0 and Knobs-v0 observation, and the
decisions of deterministic policies must be equal.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from deploy.cluster import load_cluster
from deploy.gateway.core import Gateway
from deploy.gateway.prefix_index import token_segments
from deploy.gateway.state import CallState, build_cluster_state
from envs.observation.admission import AdmissionObservation
from envs.observation.dispatch import DispatchObservation
from envs.observation.knobs import KnobsObservation
from envs.sim.cluster import ClusterSimulator
from envs.sim.config import ClusterConfig
from envs.sim.model import StepTokens
from envs.sim.workload import CallSpec, SegmentSpec, WorkflowSpec
from policies import load_policy

REPO = Path(__file__).resolve().parent.parent
ENGINE_FIELDS = ("engine_id", "name", "gpu", "healthy", "num_running", "num_waiting", "kv_usage", "outstanding_work_s",
                 "assigned_work_s", "assigned_calls", "price_per_hour", "max_num_seqs", "kv_capacity_tokens",
                 "prefix_cache_tokens")
CALL_FIELDS = ("workflow_id", "tenant", "step", "stage_index", "fanout", "input_tokens", "output_tokens",
               "ready_time_s", "deadline_s", "workflow_deadline_s", "priority")
WORKFLOW_FIELDS = ("workflow_id", "tenant", "arrival_time_s", "slo_s", "deadline_s", "calls_done",
                   "expected_remaining_s", "done")
CLUSTER_FIELDS = ("now_s", "finished_workflows", "met_workflows", "recent_arrival_rate_qps", "slo_attainment_so_far")
# deterministic policies whose decisions must agree (random ones draw from their own generator)
# the shipped admission network and the hand-written admission rule it was cloned from
ADMISSION_POLICIES = ("learned", str(REPO / "training" / "configs" / "experts" / "least-work+admit-paper.yaml"))
POLICIES = ("rr", "lor", "least-work", "llmd", "hexgen", "hexgen-outstanding", "least-work+workflow", "hexgen+triage")

PAPER_DEPLOY = {
    "name": "paper-live",
    "engines": [
        {"name": "a100-a", "url": "http://127.0.0.1:1", "gpu": "A100-80G", "architecture": "Llama-3.1-70B",
         "weight_bits": 4, "price_per_hour": 1.8},
        {"name": "a100-b", "url": "http://127.0.0.1:2", "gpu": "A100-80G", "architecture": "Llama-3.1-70B",
         "weight_bits": 4, "price_per_hour": 1.8},
        {"name": "a6000", "url": "http://127.0.0.1:3", "gpu": "A6000", "architecture": "Llama-3.1-70B",
         "weight_bits": 4, "price_per_hour": 0.8, "max_num_seqs": 64},
        {"name": "l40s", "url": "http://127.0.0.1:4", "gpu": "L40S", "architecture": "Llama-3.1-70B",
         "weight_bits": 4, "price_per_hour": 1.1},
    ],
    "gateway": {"slo_scale": 3.0, "token_scale": 1.0},
}

# three queries; stage 0 of each is placed (fan-outs included); (step, input, output) per call
WORKFLOWS = [
    [[("Information Retriever", 310, 300)], [("generate_candidate", 9000, 400)] * 2],
    [[("generate_candidate", 11000, 500), ("generate_candidate", 7800, 450), ("generate_candidate", 7800, 300)]],
    [[("revise", 5900, 120)], [("evaluate", 3000, 10)]],
]
PLACEMENT = [[0], [2, 2, 3], [1]]  # engine of each stage-0 call


class FrozenClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def local_cpu_deploy(tmp_path: Path) -> dict:
    """The shipped two-engine CPU cluster, profiles and all, with call_frontend_s off (the simulator
    then admits calls at once, and 'sent' means the same in both)."""
    raw = yaml.safe_load((REPO / "deploy" / "clusters" / "local-cpu.yaml").read_text())
    for engine in raw["engines"]:
        profile = yaml.safe_load((REPO / engine["profile"]).read_text())
        profile["call_frontend_s"] = 0.0
        path = tmp_path / f"{engine['name']}.yaml"
        path.write_text(yaml.safe_dump(profile))
        engine["profile"] = str(path)
    raw["workdir"] = str(tmp_path / "work")
    return raw


def build_both(tmp_path: Path, raw: dict, horizon_s: float, workflows=WORKFLOWS, placement=PLACEMENT, prompts=None):
    """`prompts`: the token ids of each placed call (in placement order), sent to the gateway so that
    it hashes them into its prefix index; the simulator gets the calls' segment specs instead."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    cluster = load_cluster(path)
    step_tokens = StepTokens.from_reference(cluster.gateway.token_scale)
    specs = [WorkflowSpec(tuple(tuple(CallSpec(*c) for c in stage) for stage in wf)) for wf in workflows]
    sim = ClusterSimulator(ClusterConfig(name="same", engines=cluster.engine_configs()), specs,
                           [0.0] * len(specs), slo_scale=cluster.gateway.slo_scale, step_tokens=step_tokens)
    sim_calls = []
    for targets in placement:
        for engine_id in targets:
            call = sim.next_decision()
            assert call is not None
            sim.dispatch(call, engine_id)
            sim_calls.append(call)
    assert sim.next_decision(until_s=horizon_s) is None, "the horizon must end before any stage finishes"
    assert not any(c.generated >= c.output_tokens for c in sim_calls)

    clock = FrozenClock()

    async def live() -> tuple[Gateway, list]:
        gw = Gateway(cluster, load_policy("rr"))
        gw.state = build_cluster_state(cluster, clock)
        calls = []
        for w, (wf, targets) in enumerate(zip(workflows, placement)):
            stage = wf[0]
            for (step, n_in, n_out, *_), engine_id in zip(stage, targets):
                segments = token_segments(prompts[len(calls)], gw.prefix_segment_tokens) if prompts else ()
                call = gw.new_call(workflow_key=f"q{w}", step=step, tenant="default", input_tokens=n_in,
                                   output_tokens=n_out, stream=False, stage_index=0, fanout=len(stage),
                                   segments=segments)
                gw._enqueue(call, gw.state.engines[engine_id])
                calls.append(call)
        return gw, calls

    gw, gw_calls = asyncio.run(live())
    clock.t += sim.now_s
    for sim_engine, live_engine in zip(sim.engines, gw.state.engines):  # what /metrics says now
        gw._apply_scrape(live_engine, {"vllm:num_requests_running": sim_engine.num_running,
                                       "vllm:num_requests_waiting": len(sim_engine.waiting),
                                       "vllm:kv_cache_usage_perc": sim_engine.kv_usage})
    return sim, sim_calls, gw.state, gw_calls


def assert_views_equal(sim, sim_calls, live, live_calls) -> None:
    for name in CLUSTER_FIELDS:
        assert getattr(sim, name) == pytest.approx(getattr(live, name), rel=1e-12, abs=1e-12), name
    assert len(sim.workflows) == len(live.workflows)
    steps = StepTokens.from_reference().steps() + ["a step nobody knows"]
    assert len(sim.engines) == len(live.engines)
    for se, le in zip(sim.engines, live.engines):
        for name in ENGINE_FIELDS:
            assert getattr(se, name) == getattr(le, name), f"engine {se.name}: {name}"
        for step in steps:
            assert se.expected_latency_s(step) == le.expected_latency_s(step), f"engine {se.name}: T_e({step})"
        for sc, lc in zip(sim_calls, live_calls):
            assert se.cached_prefix_tokens(sc) == le.cached_prefix_tokens(lc), f"engine {se.name}: hits of {sc}"
            assert se.expected_call_latency_s(sc) == le.expected_call_latency_s(lc), f"engine {se.name}: latency of {sc}"
    for sw, lw in zip(sim.workflows, live.workflows):
        for name in WORKFLOW_FIELDS:
            assert getattr(sw, name) == getattr(lw, name), f"workflow {sw.workflow_id}: {name}"
    assert len(sim_calls) == len(live_calls)
    for sc, lc in zip(sim_calls, live_calls):
        for name in CALL_FIELDS:
            assert getattr(sc, name) == getattr(lc, name), f"call {sc.call_id}: {name}"
    obs = DispatchObservation(max_engines=8)
    for sc, lc in zip(sim_calls, live_calls):
        np.testing.assert_array_equal(obs.build(sc, sim), obs.build(lc, live))
        np.testing.assert_array_equal(obs.valid_actions(sim), obs.valid_actions(live))
    knobs = KnobsObservation(n_knobs=2)
    action = np.array([0.1, -0.3], dtype=np.float32)
    knobs.reset(sim)
    sim_knobs = knobs.build(sim, action)
    knobs.reset(live)
    np.testing.assert_array_equal(sim_knobs, knobs.build(live, action))
    admission_obs = AdmissionObservation(max_engines=8)
    for sc, lc in zip(sim_calls, live_calls):
        np.testing.assert_array_equal(admission_obs.build(sc, sim, {0}), admission_obs.build(lc, live, {0}))
    for name in ADMISSION_POLICIES:  # the admission decision (`Policy.admit`) is asked of both views alike
        policy = load_policy(name)
        for sc, lc in zip(sim_calls, live_calls):
            policy.reset()
            admitted = policy.admit(sc, sim)
            policy.reset()
            assert admitted == policy.admit(lc, live), f"{name} admit"
    for name in POLICIES:
        policy = load_policy(name)
        for sc, lc in zip(sim_calls, live_calls):
            policy.reset()
            chosen = policy.dispatch(sc, sim)
            policy.reset()
            assert chosen == policy.dispatch(lc, live), f"{name} dispatch"
            for se, le in zip(sim.engines, live.engines):
                assert policy.queue_key(sc, se) == policy.queue_key(lc, le), f"{name} queue key"


def test_paper_cluster_views_are_equal(tmp_path) -> None:
    """GPU engines described by catalog GPU and architecture (the roofline), KV-bound A6000 included."""
    sim, sim_calls, live, live_calls = build_both(tmp_path, PAPER_DEPLOY, horizon_s=1.0)
    assert any(e.num_waiting for e in sim.engines), "some engine must hold a call it cannot batch yet"
    assert any(e.kv_usage > 0 for e in sim.engines)
    assert_views_equal(sim, sim_calls, live, live_calls)


def test_local_cpu_cluster_views_are_equal(tmp_path) -> None:
    """The shipped CPU cluster: measured profiles, scaled step tokens, explicit engine names."""
    workflows = [[[("Information Retriever", 15, 30)], [("revise", 300, 8)]],
                 [[("generate_candidate", 500, 25)] * 3]]
    sim, sim_calls, live, live_calls = build_both(tmp_path, local_cpu_deploy(tmp_path), horizon_s=0.02,
                                                  workflows=workflows, placement=[[0], [1, 1, 0]])
    assert [e.name for e in sim.engines] == ["fast", "slow"]
    assert_views_equal(sim, sim_calls, live, live_calls)


def test_parity_check_can_fail(tmp_path) -> None:
    """The comparison notices a difference the old gateway had: KV capacity unknown to the view."""
    sim, sim_calls, live, live_calls = build_both(tmp_path, PAPER_DEPLOY, horizon_s=1.0)
    live.engines[2].scraped_kv_capacity_tokens = live.engines[2].kv_capacity_tokens + 16
    with pytest.raises(AssertionError, match="kv_capacity_tokens"):
        assert_views_equal(sim, sim_calls, live, live_calls)


# prompts with shared templates: the simulator gets their segment specs, the gateway their token ids
CAND, REV = SegmentSpec("template", "cand", 800), SegmentSpec("template", "rev", 600)
CACHED_WORKFLOWS = [
    [[("generate_candidate", 900, 40, (CAND,))], [("revise", 700, 8, (REV,))]],
    [[("generate_candidate", 1000, 40, (CAND,))] * 2, [("generate_candidate", 850, 5, (CAND,))]],
    [[("revise", 650, 30, (REV,))], [("revise", 700, 8, (REV,))]],
]


def template_prompt(call_key: str, n_in: int, segments) -> list[int]:
    """Token ids: each template's ids fixed by its name, then ids of the call's own."""
    out: list[int] = []
    for seg in segments:
        rng = random.Random(seg.name)
        out += [rng.randrange(10, 30000) for _ in range(seg.tokens)]
    rng = random.Random(call_key)
    return out + [rng.randrange(10, 30000) for _ in range(n_in - len(out))]


def test_prefix_cache_views_are_equal(tmp_path) -> None:
    """Calls sharing templates, placed on the CPU cluster (block 128): the gateway's index, fed
    the calls' token ids, and the simulator's cache, fed their segment specs, show policies the
    same cached tokens for every placed call and for the workflows' next calls on every engine,
    and cache-aware policies decide alike."""
    placement = [[0], [0, 0], [1]]
    prompts = [template_prompt(f"q{w}-{i}", n_in, segs)
               for w, wf in enumerate(CACHED_WORKFLOWS) for i, (_, n_in, _, segs) in enumerate(wf[0])]
    sim, sim_calls, live, live_calls = build_both(tmp_path, local_cpu_deploy(tmp_path), horizon_s=0.03,
                                                  workflows=CACHED_WORKFLOWS, placement=placement, prompts=prompts)
    assert all(c.admit_time_s == c.admit_time_s for c in sim_calls), "every placed call must be in its engine's batch"
    # engine 0: the candidate template's 6 blocks and each call's own 7th; engine 1: revise's 4 and 1
    assert [e.prefix_cache_tokens for e in live.engines] == [9 * 128, 5 * 128]
    assert_views_equal(sim, sim_calls, live, live_calls)
    # the workflows' next calls (not ready yet): the same hits on every engine, the same choices
    probes = []
    for w, wf in enumerate(CACHED_WORKFLOWS):
        sim_probe = sim.workflows[w].stages[1][0]
        step, n_in, n_out, segs = wf[1][0]
        live_probe = CallState(**{name: getattr(sim_probe, name) for name in CALL_FIELDS}, call_id=100 + w,
                               segments=token_segments(template_prompt(f"probe{w}", n_in, segs), 128))
        probes.append((sim_probe, live_probe))
    hits = [[e.cached_prefix_tokens(lp) for e in live.engines] for _, lp in probes]
    assert hits == [[0, 512], [768, 0], [0, 512]]
    for sp, lp in probes:
        for se, le in zip(sim.engines, live.engines):
            assert se.cached_prefix_tokens(sp) == le.cached_prefix_tokens(lp)
            assert se.expected_call_latency_s(sp) == le.expected_call_latency_s(lp)
    for name in ("llmd-prefix", "sglang-cache-aware", "least-work+workflow"):
        policy = load_policy(name)
        chosen = []
        for sp, lp in probes:
            policy.reset()
            chosen.append(policy.dispatch(sp, sim))
            policy.reset()
            assert chosen[-1] == policy.dispatch(lp, live), f"{name} dispatch"
        if name == "sglang-cache-aware":  # each next call goes where its template is cached
            assert chosen == [1, 0, 1]
