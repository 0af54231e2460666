"""Workflow-level admission: the simulator's deferral, the defer-late heuristic, Dispatch-v1 (same
run as `simulate` for the same decisions), and the Dispatch-v1 network's save/load round trip."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import envs.gym  # noqa: F401  (registers the ids)
from envs import ADMISSION_ENV_ID
from envs.observation import InvalidActionError
from envs.sim.cluster import DEFERRED_OFFSET_S
from envs.sim.scenario import RunSpec, build_simulator, simulate
from heuristics.admission import DeferLate
from policies import PolicyError, load_policy, policy_from_spec
from policies.base import Policy

ADMIT = {"kind": "heuristic", "base": "least-work+workflow",
         "admission": {"name": "defer-late", "margin": 1.5, "active_per_engine": 2.0}}
SPEC = RunSpec(cluster="paper", rate_qps=0.4, queries=30, seed=7)


class DeferOdd(Policy):
    """Defers every workflow with an odd id; least-work+workflow otherwise."""

    name = "defer-odd"

    def __init__(self) -> None:
        self.base = load_policy("least-work+workflow")

    def admit(self, call, cluster) -> bool:
        return call.workflow_id % 2 == 0

    def dispatch(self, call, cluster) -> int:
        return self.base.dispatch(call, cluster)

    def queue_key(self, call, engine) -> float:
        return self.base.queue_key(call, engine)


def test_policy_default_admits_and_changes_nothing():
    plain = load_policy("least-work+workflow")
    assert plain.admit is not None and Policy.admit(plain, None, None) is True
    result, sim = simulate(SPEC, plain)
    assert not any(w.deferred for w in sim.workflows)
    # an admission rule that never defers (margin 0, no cap) gives the same run, decision for decision
    never = policy_from_spec({**ADMIT, "admission": {"name": "defer-late", "margin": 0.0}})
    again, sim2 = simulate(SPEC, never)
    assert [c.engine_id for c in sim.calls] == [c.engine_id for c in sim2.calls]
    assert again["goodput_qps"] == result["goodput_qps"]


def test_deferred_workflows_queue_last_and_still_finish():
    result, sim = simulate(SPEC, DeferOdd())
    deferred = [w for w in sim.workflows if w.deferred]
    assert deferred and all(w.workflow_id % 2 for w in deferred)
    assert all(w.done for w in sim.workflows)  # work-conserving: deferred ones still run
    assert result["n_finished"] == SPEC.queries
    # the metric scores them as usual: a late deferred workflow is a miss
    assert sim.met_workflows == sum(w.met_slo for w in sim.workflows)
    admitted = [w for w in sim.workflows if not w.deferred]
    mean = lambda ws: np.mean([w.finish_time_s - w.arrival_time_s for w in ws])  # noqa: E731
    assert mean(admitted) < mean(deferred)


def test_defer_workflow_moves_queued_calls_behind_admitted_ones():
    sim = build_simulator(SPEC, queue_key=lambda c, e: c.ready_time_s)
    policy = load_policy("least-work")
    queued = None
    while queued is None:
        call = sim.next_decision()
        sim.dispatch(call, 0)  # pile everything onto engine 0
        waiting = sim.engines[0].waiting
        if len({entry[2].workflow_id for entry in waiting}) >= 2:
            queued = waiting[0][2].workflow_id
    sim.defer_workflow(queued)
    keys = {entry[2].workflow_id: entry[0] for entry in sim.engines[0].waiting}
    assert keys[queued] >= DEFERRED_OFFSET_S
    assert sim.engines[0].waiting[0][2].workflow_id != queued  # an admitted workflow's call is first now
    sim.run(policy)
    assert sim.done


def test_defer_late_rule():
    sim = build_simulator(SPEC)
    call = sim.next_decision()
    rule = DeferLate(margin=1.0)
    assert rule.admit(call, sim)  # a fresh workflow with a 3x SLO fits
    assert not DeferLate(margin=50.0).admit(call, sim)  # 50 solo runs of the rest do not
    capped = DeferLate(margin=0.0, active_per_engine=0.25)  # one admitted workflow on 4 engines
    assert capped.admit(call, sim)
    sim.dispatch(call, 0)
    while True:
        nxt = sim.next_decision()
        if nxt.workflow_id != call.workflow_id:
            break
        sim.dispatch(nxt, 0)
    assert not capped.admit(nxt, sim)  # the first is still running: the second waits
    with pytest.raises(PolicyError, match="margin"):
        policy_from_spec({**ADMIT, "admission": {"name": "defer-late", "margin": -1}})
    with pytest.raises(PolicyError, match="admission"):
        policy_from_spec({**ADMIT, "admission": {"name": "nope"}})


def test_dispatch_v1_reproduces_simulate_with_the_heuristic():
    expert = policy_from_spec(ADMIT)
    result, sim = simulate(SPEC, expert)
    env = gym.make(ADMISSION_ENV_ID, scenario={"cluster": "paper"}, local_order="workflow-first",
                   local_knobs={"margin": 2.0})
    assert env.action_space.n == 5  # 4 engines + defer
    obs, info = env.reset(options={"run_spec": SPEC})
    assert info["action_mask"][-1] == 1
    done, ret, defers = False, 0.0, 0
    while not done:
        action = env.unwrapped.heuristic_action(expert)
        defers += action == env.unwrapped.defer_action
        obs, reward, term, trunc, info = env.step(action)
        ret += reward
        done = term or trunc
    m = info["metrics"]
    assert defers > 0 and m["deferred_workflows"] == sum(w.deferred for w in sim.workflows) == defers
    assert m["goodput_qps"] == result["goodput_qps"] and m["slo_attainment"] == result["slo_attainment"]
    assert math.isclose(ret, sim.met_workflows)  # no tardiness term by default: the return counts SLO-met workflows
    with pytest.raises(InvalidActionError, match="defer"):
        env.reset(options={"run_spec": SPEC})
        env.step(7)


def test_dispatch_v1_passes_the_env_checker():
    from gymnasium.utils.env_checker import check_env

    env = gym.make(ADMISSION_ENV_ID, scenario={"cluster": "paper", "queries": 4, "rate_qps": 0.3})
    check_env(env.unwrapped)


def test_differential_reward_subtracts_the_average_rate():
    env = gym.make(ADMISSION_ENV_ID, scenario={"cluster": "paper", "queries": 8, "rate_qps": 0.3},
                   differential=True).unwrapped
    for _ in range(2):
        _, info = env.reset(options={"episode_seed": 3})
        done, ret = False, 0.0
        while not done:
            _, r, term, trunc, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
            ret += r
            done = term or trunc
    assert env.reward_rate > 0  # learned from the first episode
    assert ret < env.simulator.met_workflows  # the second episode's return is net of rho x span


@pytest.fixture(scope="module")
def v1_policy(tmp_path_factory):
    """An untrained, seeded MaskablePPO engine scorer with the defer logit, saved as a policy."""
    from training.config import TrainConfig
    from training.envs import make_vec_env
    from training.train import build_model, policy_meta, save_policy_dir

    cfg = TrainConfig.parse({"name": "v1", "env_id": ADMISSION_ENV_ID, "n_envs": 1, "vec_env": "dummy",
                             "policy": "EngineScoringPolicy", "scenarios": [{"queries": 6, "cluster": "paper"}],
                             "env_kwargs": {"max_engines": 5, "local_order": "workflow-first"},
                             "hyperparams": {"n_steps": 64, "batch_size": 32}})
    venv = make_vec_env(cfg)
    model = build_model(cfg, venv, None)
    with __import__("torch").no_grad():  # make "defer" likely, so both branches run
        model.policy.mlp_extractor.defer_linear.bias.fill_(0.0)
    out = tmp_path_factory.mktemp("v1") / "policy"
    save_policy_dir(out, model, cfg, policy_meta(cfg, venv), None)
    return out, model


def test_v1_policy_round_trips_with_identical_decisions(v1_policy):
    path, model = v1_policy
    a, b = load_policy(path), load_policy(path)
    spec = RunSpec(cluster="paper", rate_qps=0.3, queries=12, seed=5)
    ra, sa = simulate(spec, a)
    rb, sb = simulate(spec, b)
    assert [c.engine_id for c in sa.calls] == [c.engine_id for c in sb.calls]
    assert [w.deferred for w in sa.workflows] == [w.deferred for w in sb.workflows]
    assert ra["n_finished"] == 12
    obs = np.random.default_rng(0).uniform(-1, 1, size=(8, model.observation_space.shape[0])).astype(np.float32)
    for o in obs:
        live = model.policy.mlp_extractor.forward_actor(__import__("torch").as_tensor(o[None]))[0].detach().numpy()
        assert live.shape == (6,) and model.observation_space.shape[0] == a._admission_obs.size
        np.testing.assert_allclose(a.action_logits(o), live, rtol=1e-5, atol=1e-6)
    # a caller that never asks admit (the gateway) still gets a healthy engine for every call
    sim = build_simulator(spec)
    call = sim.next_decision()
    assert 0 <= a.dispatch(call, sim) < len(sim.engines)
