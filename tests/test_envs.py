"""Gymnasium envs: API conformance (both checkers), determinism, masks, invalid actions, and the
equivalence of heuristics run through the env with `agentsched simulate`."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from pydantic import ValidationError

import envs.gym  # noqa: F401  (registers the envs)
from envs.gym import InvalidActionError, Scenario
from envs.sim.cells import Cell
from envs.sim.scenario import simulate

SMALL = {"queries": 12}
RANDOMIZED = {"queries": 10, "randomize": {"random_cluster": {"engines": [2, 6]}, "arrivals": ["poisson", "gamma", "diurnal"]}}


def _make(**kwargs):
    return gym.make("agentsched/Dispatch-v0", **kwargs)


def _same_metrics(a: dict, b: dict) -> list[str]:
    """Keys whose values differ (wall-clock time and the policy label excepted)."""
    out = []
    for key in a:
        if key in ("sim_wall_s", "policy"):
            continue
        x, y = a[key], b[key]
        if isinstance(x, float) and math.isnan(x) and isinstance(y, float) and math.isnan(y):
            continue
        if x != y:
            out.append(key)
    return out


@pytest.mark.parametrize("scenario", [SMALL, RANDOMIZED], ids=["fixed", "randomized"])
def test_gymnasium_and_sb3_checkers_pass(scenario):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = _make(scenario=scenario)
    gym_check(env.unwrapped, skip_render_check=True)
    sb3_check(env.unwrapped, warn=True)


def _rollout(env, seed: int, n: int = 400) -> tuple[list[np.ndarray], list[float]]:
    obs, info = env.reset(seed=seed)
    observations, rewards = [obs], []
    for _ in range(n):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            obs, info = env.reset()
            observations.append(obs)
    return observations, rewards


def test_same_seed_same_trajectory():
    a, b = _make(scenario=RANDOMIZED), _make(scenario=RANDOMIZED)
    a.action_space.seed(5)
    b.action_space.seed(5)
    oa, ra = _rollout(a, seed=7)
    ob, rb = _rollout(b, seed=7)
    assert ra == rb
    assert all(np.array_equal(x, y) for x, y in zip(oa, ob))


def test_observations_stay_in_bounds_under_overload():
    env = _make(scenario={"queries": 30, "rate_qps": 5.0, "slo_scale": 1.5})
    obs, info = env.reset(seed=0)
    space = env.observation_space
    done = False
    worst = 0.0
    while not done:
        # everything on the slowest engine: the heaviest overload a policy can cause
        obs, reward, terminated, truncated, info = env.step(2)
        assert space.contains(obs), obs
        worst = max(worst, float(np.abs(obs).max()))
        done = terminated or truncated
    assert worst <= space.high[0]
    assert info["metrics"]["n_workflows"] == 30


@pytest.mark.parametrize("policy_name", ["hexgen", "rr"])
def test_heuristic_through_env_matches_simulate(policy_name):
    from policies import load_policy

    env = _make(scenario={"queries": 25, "rate_qps": 0.08}, local_order=policy_name)
    policy = load_policy(policy_name)
    for episode_seed in (1, 2):
        obs, info = env.reset(options={"episode_seed": episode_seed})
        done = False
        while not done:
            obs, reward, terminated, truncated, info = env.step(env.unwrapped.heuristic_action(policy))
            done = terminated or truncated
        assert terminated and not truncated
        reference, _ = simulate(env.unwrapped.scenario.run_spec(episode_seed), load_policy(policy_name))
        assert _same_metrics(reference, info["metrics"]) == []
        assert info["run_spec"] == env.unwrapped.scenario.run_spec(episode_seed)


def test_invalid_and_masked_actions_raise():
    env = _make(scenario=SMALL, max_engines=6)
    obs, info = env.reset(seed=0)
    assert info["action_mask"].tolist() == [1, 1, 1, 1, 0, 0]
    assert env.unwrapped.action_masks().tolist() == [True] * 4 + [False] * 2
    with pytest.raises(InvalidActionError, match="masked: padding"):
        env.step(4)
    with pytest.raises(InvalidActionError, match="out of range"):
        env.step(6)
    with pytest.raises(InvalidActionError, match="out of range"):
        env.step(-1)
    with pytest.raises(InvalidActionError, match="integer"):
        env.step(1.5)
    env.step(np.int64(1))  # numpy integers and 1-element arrays are fine
    env.step(np.array([0]))


def test_failed_engine_is_masked():
    scenario = {"queries": 12, "failures": [{"engine": 0, "at_s": 0.0, "duration_s": 1e6}]}
    env = _make(scenario=scenario)
    obs, info = env.reset(seed=0)
    done = False
    while not done:
        assert info["action_mask"][0] == 0
        with pytest.raises(InvalidActionError, match="is down"):
            env.unwrapped._check_action(0)
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated


def test_horizon_truncates():
    env = _make(scenario={"queries": 40, "rate_qps": 0.3, "horizon_s": 120.0})
    obs, info = env.reset(seed=0)
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    assert truncated and not terminated
    assert env.unwrapped.simulator.now_s == pytest.approx(120.0)
    assert "metrics" in info


def test_scenario_run_spec_is_deterministic_and_randomized():
    scenario = Scenario.model_validate(RANDOMIZED)
    a, b = scenario.run_spec(4), scenario.run_spec(4)
    assert a == b
    specs = [scenario.run_spec(s) for s in range(20)]
    assert len({round(s.rate_qps, 9) for s in specs}) == 20
    assert {len(s.cluster_config().expanded()) for s in specs} <= set(range(2, 7))
    assert all(0.02 <= s.rate_qps <= 0.3 and 1.5 <= s.slo_scale <= 6.0 for s in specs)



def test_scenarios_draw_the_evaluation_cells_shifting_loads():
    """A scenario's "step" / "burst" arrivals are the evaluation cell's load shape at the same rate
    and run length (one definition, envs.sim.cells), so training can see the shapes it is tested on."""
    for shape in ("step", "burst"):
        scenario = Scenario(cluster="mixed-16", queries=480, rate_qps=1.2, arrivals=shape)
        cell = Cell(cluster="mixed-16", rate_qps=1.2, load=shape, queries=480)
        assert scenario.run_spec(3).arrivals == cell.arrivals()
        a, b = scenario.run_spec(3), cell.run_spec(3)
        assert (a.arrivals, a.rate_qps, a.queries, a.cluster) == (b.arrivals, b.rate_qps, b.queries, b.cluster)
    drawn = Scenario.model_validate({"queries": 40, "randomize": {"arrivals": ["step", "burst"]}})
    kinds = {tuple(seg.rate_qps / spec.rate_qps for seg in spec.arrivals.segments)
             for spec in (drawn.run_spec(s) for s in range(12))}
    assert kinds == {(0.5, 1.5), (0.5, 3.0, 0.5)}
    with pytest.raises(ValidationError, match="arrivals"):
        Scenario.model_validate({"arrivals": "ramp"})

# ---- vectorised envs ----------------------------------------------------------------------------

VEC_SCENARIO = {"queries": 6, "randomize": {"random_cluster": {"engines": [2, 4]}}}


def _make_vec_dispatch():
    return gym.make("agentsched/Dispatch-v0", scenario=VEC_SCENARIO)


def _vector_rollout(venv, steps: int = 120) -> tuple[np.ndarray, np.ndarray]:
    obs, info = venv.reset(seed=[21, 22])
    observations, rewards = [obs], []
    for t in range(steps):
        # a deterministic valid choice per sub-env (any action is ignored on an autoreset step)
        actions = np.array([np.flatnonzero(m)[t % m.sum()] if m.any() else 0 for m in info["action_mask"]])
        obs, reward, terminated, truncated, info = venv.step(actions)
        observations.append(obs)
        rewards.append(reward)
    venv.close()
    return np.array(observations), np.array(rewards)


def test_async_vector_env_matches_sync_and_repeats():
    from gymnasium.vector import AsyncVectorEnv, SyncVectorEnv

    a = _vector_rollout(AsyncVectorEnv([_make_vec_dispatch] * 2))
    b = _vector_rollout(AsyncVectorEnv([_make_vec_dispatch] * 2))
    c = _vector_rollout(SyncVectorEnv([_make_vec_dispatch] * 2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1])


def _sb3_rollout(vec_env_cls, steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    from stable_baselines3.common.env_util import make_vec_env

    # "module:id": SB3's subprocesses start fresh (forkserver) and must import `envs` to register the ids
    venv = make_vec_env("envs.gym:agentsched/Dispatch-v0", n_envs=2, seed=3, vec_env_cls=vec_env_cls,
                        env_kwargs={"scenario": VEC_SCENARIO, "render_mode": None})
    obs = venv.reset()
    observations, rewards = [obs], []
    for t in range(steps):
        masks = np.array(venv.env_method("action_masks"))
        obs, reward, dones, infos = venv.step(np.array([np.flatnonzero(m)[t % m.sum()] for m in masks]))
        observations.append(obs)
        rewards.append(reward.astype(np.float64))
    venv.close()
    return np.array(observations), np.array(rewards)


def test_sb3_subproc_vec_env_matches_dummy():
    """SubprocVecEnv (SB3's default forkserver processes) gives DummyVecEnv's trajectory, which
    is itself seed-deterministic (test_same_seed_same_trajectory); one subprocess run keeps the
    test short (each worker imports torch)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    a = _sb3_rollout(SubprocVecEnv)
    c = _sb3_rollout(DummyVecEnv)
    assert np.array_equal(a[0], c[0])
    assert np.allclose(a[1], c[1], rtol=1e-6)  # DummyVecEnv stores rewards as float32


def test_maskable_ppo_trains_on_dispatch():
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env("agentsched/Dispatch-v0", n_envs=2, seed=0,
                        env_kwargs={"scenario": VEC_SCENARIO, "max_engines": 6, "render_mode": None})
    model = MaskablePPO("MlpPolicy", venv, n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(32)
    obs = venv.reset()
    masks = np.array(venv.env_method("action_masks"))
    actions, _ = model.predict(obs, action_masks=masks)
    assert all(m[a] for m, a in zip(masks, actions))


# ---- Knobs-v0 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", [SMALL, RANDOMIZED], ids=["fixed", "randomized"])
def test_knobs_env_checkers_pass(scenario):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = gym.make("agentsched/Knobs-v0", scenario=scenario)
    gym_check(env.unwrapped, skip_render_check=True)
    sb3_check(env.unwrapped, warn=True)


def test_knobs_constant_action_matches_simulate():
    env = gym.make("agentsched/Knobs-v0", scenario={"queries": 20, "rate_qps": 0.1})
    knobs = env.unwrapped
    action = knobs.action_for_knobs({"alpha": 0.5, "weight": 0.5})
    assert knobs.knobs_for(action) == pytest.approx({"alpha": 0.5, "weight": 0.5})
    obs, info = env.reset(options={"episode_seed": 4})
    done, steps = False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        done, steps = terminated or truncated, steps + 1
    assert steps > 5
    reference, _ = simulate(knobs.scenario.run_spec(4), knobs.policy_for(action))
    assert _same_metrics(reference, info["metrics"]) == []


def test_knobs_invalid_actions_raise():
    env = gym.make("agentsched/Knobs-v0", scenario=SMALL)
    env.reset(seed=0)
    for bad, match in (([1.5, 0.0], "outside"), ([0.0], "shape"), ([np.nan, 0.0], "finite")):
        with pytest.raises(InvalidActionError, match=match):
            env.step(np.array(bad, dtype=np.float32))


def test_knobs_unknown_knob_is_a_clear_error():
    from policies.base import PolicyError

    with pytest.raises(PolicyError, match="no knob 'beta'"):
        gym.make("agentsched/Knobs-v0", knobs=[{"name": "beta", "layer": "dispatch", "low": 0, "high": 1}])


# ---- Scenario ------------------------------------------------------------------------------------------


def test_scenario_yaml_round_trip_and_errors(tmp_path):
    from envs.sim.errors import UserError

    path = tmp_path / "train.yaml"
    path.write_text("queries: 15\nworkload: generator\narrivals: diurnal\nrate_qps: 0.1\n"
                    "randomize:\n  rate_qps: [0.05, 0.2]\n  clusters: [paper, mixed-16]\n")
    scenario = Scenario.load(path)
    from envs.sim.config import load_cluster

    largest = max(len(load_cluster(c).expanded()) for c in ("paper", "mixed-16"))
    assert scenario.max_engines() == largest
    spec = scenario.run_spec(0)
    assert spec.generated and spec.arrivals.kind == "piecewise"
    env = _make(scenario=str(path))
    assert env.action_space.n == largest
    path.write_text("randomize:\n  rate_qps: [0.3, 0.1]\n")
    with pytest.raises(UserError, match="rate_qps"):
        Scenario.load(path)
    path.write_text("queries: 0\n")
    with pytest.raises(UserError, match="queries"):
        Scenario.load(path)
    with pytest.raises(ValueError, match="max_engines"):
        _make(scenario=SMALL, max_engines=2)


@pytest.mark.parametrize("name", ["default", "train-randomized", "test-heldout"])
def test_shipped_scenarios_run(name):
    env = _make(scenario=name)
    assert env.action_space.n == Scenario.coerce(name).max_engines()
    obs, info = env.reset(seed=0)
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        if terminated or truncated:
            obs, info = env.reset()


def test_bounds_hold_on_extreme_random_clusters():
    """Huge TP-8 engines (price 8x), tiny 2-engine clusters, 20x overload, tight SLOs: every
    observation of both envs stays inside the declared box."""
    scenario = {"queries": 25, "randomize": {
        "rate_qps": [0.01, 5.0], "slo_scale": [0.5, 20.0], "arrivals": ["poisson", "gamma", "diurnal"],
        "burstiness_cv": [1.0, 8.0],
        "random_cluster": {"engines": [1, 5], "engine_types": [
            {"gpu": "H100", "model": "Llama-3.1-70B", "tp": 8},
            {"gpu": "A6000", "model": "Llama-3.1-70B", "weight_bits": 4},
            {"gpu": "L40S", "model": "Llama-3.1-70B", "tp": 2, "weight_bits": 8}]}}}
    for env_id in ("agentsched/Dispatch-v0", "agentsched/Knobs-v0"):
        env = gym.make(env_id, scenario=scenario)
        env.action_space.seed(0)
        obs, info = env.reset(seed=1)
        for _ in range(600 if env_id.endswith("Dispatch-v0") else 60):
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            assert env.observation_space.contains(obs), (env_id, obs)
            assert np.isfinite(reward)
            if terminated or truncated:
                obs, info = env.reset()


def test_observation_builder_works_from_the_view_inside_simulate():
    """A trained policy inside `simulate` (or the gateway) sees exactly the env's observations:
    the builder reads only the view protocols."""
    from envs.observation.dispatch import DispatchObservation
    from policies import load_policy
    from policies.base import Policy

    env = _make(scenario={"queries": 10}, max_engines=6)
    hexgen = load_policy("hexgen")
    obs, info = env.reset(options={"episode_seed": 5})
    from_env, done = [obs], False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.unwrapped.heuristic_action(hexgen))
        done = terminated or truncated
        if not done:
            from_env.append(obs)

    class Recording(Policy):
        name = "recording"

        def __init__(self):
            self.inner = load_policy("hexgen")
            self.builder = DispatchObservation(6)
            self.seen: list[np.ndarray] = []

        def dispatch(self, call, cluster):
            self.seen.append(self.builder.build(call, cluster))
            assert self.builder.valid_actions(cluster).tolist() == [1, 1, 1, 1, 0, 0]
            return self.inner.dispatch(call, cluster)

        def queue_key(self, call, engine):
            return self.inner.queue_key(call, engine)

        def reset(self):
            self.inner.reset()

    recording = Recording()
    simulate(env.unwrapped.scenario.run_spec(5), recording)
    assert len(recording.seen) == len(from_env)
    assert all(np.array_equal(a, b) for a, b in zip(recording.seen, from_env))


# ---- reward -----------------------------------------------------------------------------------------

TIGHT_CLUSTER = {"name": "tight", "engines": [
    {"gpu": "A100-80G", "model": "Llama-3.1-70B", "weight_bits": 4},
    # KV cache for only ~12k tokens: the longest CHESS calls cannot run here
    {"gpu": "A6000", "model": "Llama-3.1-70B", "weight_bits": 4, "gpu_memory_utilization": 0.86}]}


def _episode(env, seed: int, choose) -> tuple[float, dict, object]:
    obs, info = env.reset(options={"episode_seed": seed})
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(choose(env, info))
        total += reward
        done = terminated or truncated
    return total, info, env.unwrapped.simulator


@pytest.mark.parametrize("scenario", [{"queries": 25, "rate_qps": 0.2, "slo_scale": 1.5},
                                      {"queries": 25, "rate_qps": 0.2, "slo_scale": 1.5, "horizon_s": 400.0},
                                      {"queries": 15, "cluster": TIGHT_CLUSTER, "slo_scale": 1.0}],
                         ids=["overload", "truncated", "rejections"])
def test_return_is_met_minus_tardiness_minus_rejections(scenario):
    """The incremental reward adds up to its definition, computed directly from the workflows."""
    env = _make(scenario=scenario)
    env.action_space.seed(0)
    total, info, sim = _episode(env, 2, lambda env, info: env.action_space.sample())
    end = sim.now_s
    tardiness = sum(max(0.0, min(end, w.finish_time_s if w.done else end) - w.deadline_s) / w.slo_s
                    for w in sim.workflows)
    expected = sim.met_workflows - tardiness - sim.failed_calls
    assert total == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert tardiness > 0
    if "cluster" in scenario:
        assert sim.failed_calls > 0


def test_mask_infeasible_keeps_long_calls_off_small_engines():
    env = _make(scenario={"queries": 15, "cluster": TIGHT_CLUSTER}, mask_infeasible=True)
    env.action_space.seed(0)
    seen_masked = False

    def choose(env, info):
        nonlocal seen_masked
        call = env.unwrapped.pending_call
        if call.input_tokens + call.output_tokens > 12144:
            assert info["action_mask"].tolist() == [1, 0]
            seen_masked = True
        return env.action_space.sample()

    total, info, sim = _episode(env, 2, choose)
    assert seen_masked and sim.failed_calls == 0 and info["metrics"]["n_failed"] == 0


def test_knob_policy_runs_inside_simulate():
    """`knobs_observation` / `apply_knobs` let a knob policy act through `Policy.on_interval` in
    `simulate`, seeing observations of Knobs-v0's space."""
    from policies import load_policy
    from policies.base import Policy
    from policies.knob_control import apply_knobs, knobs_observation

    class HalfKnobs(Policy):
        name = "half-knobs"
        interval_s = 30.0

        def __init__(self):
            self.inner = load_policy("hexgen")
            self.state = None
            self.seen = []

        def reset(self):
            self.inner.reset()
            self.state = None

        def dispatch(self, call, cluster):
            return self.inner.dispatch(call, cluster)

        def queue_key(self, call, engine):
            return self.inner.queue_key(call, engine)

        def on_interval(self, cluster):
            obs, self.state = knobs_observation(cluster, self.state)
            self.seen.append(obs)
            apply_knobs(self.inner, np.array([0.0, 0.5]), state=self.state)

    env = gym.make("agentsched/Knobs-v0", scenario={"queries": 10})
    policy = HalfKnobs()
    simulate(env.unwrapped.scenario.run_spec(1), policy)
    assert len(policy.seen) > 3 and all(env.observation_space.contains(o) for o in policy.seen)
    assert policy.inner.dispatcher.alpha == 0.5 and policy.inner.local.weight == 0.75


def test_hexgen_through_env_matches_the_simulate_command(tmp_path, capsys, monkeypatch):
    """The acceptance check, literally: `agentsched simulate --policy hexgen` with the scenario's
    flags and the episode seed writes the metrics the env reports for that episode."""
    import json
    import sys

    from agentsched.cli import main
    from policies import load_policy

    out = tmp_path / "hexgen.json"
    monkeypatch.setattr(sys, "argv", ["agentsched", "simulate", "--policy", "hexgen", "--trace", "chess_trace1",
                                      "--cluster", "paper", "--rate", "0.08", "--slo-scale", "2.5", "--seed", "9",
                                      "--queries", "20", "--out", str(out)])
    main()
    capsys.readouterr()
    cli = json.loads(out.read_text())
    env = _make(scenario={"queries": 20, "rate_qps": 0.08, "slo_scale": 2.5}, local_order="hexgen")
    hexgen = load_policy("hexgen")
    obs, info = env.reset(options={"episode_seed": 9})
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.unwrapped.heuristic_action(hexgen))
        done = terminated or truncated
    ours = json.loads(json.dumps(info["metrics"]))  # the same JSON round trip as the command's file
    assert _same_metrics(cli, ours) == []


def test_scenario_rejects_unknown_trace_and_cluster_up_front():
    from pydantic import ValidationError

    for bad, where in (({"trace": "nope"}, "trace"), ({"cluster": "nope"}, "cluster"),
                       ({"randomize": {"clusters": ["paper", "nope"]}}, "randomize.clusters")):
        with pytest.raises(ValidationError, match=where):
            Scenario.model_validate(bad)


def test_workflow_templates_and_tenants():
    scenario = {"trace": "react-agent.yaml", "queries": 8,
                "tenants": [{"name": "gold", "priority": 0, "slo_scale": 0.7}, {"name": "bronze", "priority": 2, "share": 2}]}
    env = _make(scenario=scenario)
    obs, info = env.reset(seed=0)
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        done = terminated or truncated
    assert set(info["metrics"]["per_tenant"]) == {"gold", "bronze"}


def test_reset_with_a_run_spec():
    from envs.sim.scenario import RunSpec
    from policies import load_policy

    spec = RunSpec(trace="chess_trace2", cluster="paper", rate_qps=0.1, slo_scale=2.0, seed=3, queries=10)
    env = _make(scenario=SMALL, local_order="hexgen")
    hexgen = load_policy("hexgen")
    obs, info = env.reset(options={"run_spec": spec})
    assert info["episode_seed"] == 3
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.unwrapped.heuristic_action(hexgen))
        done = terminated or truncated
    assert _same_metrics(simulate(spec, load_policy("hexgen"))[0], info["metrics"]) == []
    too_big = spec.model_copy(update={"cluster": "mixed-16"})
    with pytest.raises(ValueError, match="max_engines"):
        env.reset(options={"run_spec": too_big})


def test_knob_schedule_same_in_env_and_in_simulate():
    """Knobs changed every interval give the same run in Knobs-v0 and in `simulate` through
    `Policy.on_interval` (ticks at the same simulated times), so a knob policy evaluated in
    `simulate` is evaluated on the env's terms."""
    from policies import load_policy
    from policies.base import Policy
    from policies.knob_control import apply_knobs

    schedule = [np.array([np.sin(k), np.cos(3 * k)], dtype=np.float32) for k in range(400)]
    env = gym.make("agentsched/Knobs-v0", scenario={"queries": 20, "rate_qps": 0.12})
    obs, info = env.reset(options={"episode_seed": 6})
    done, k = False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step(schedule[k])
        done, k = terminated or truncated, k + 1

    class Scheduled(Policy):
        name = "scheduled"
        interval_s = env.unwrapped.control_interval_s

        def __init__(self):
            self.inner = load_policy("hexgen")
            self.k = 0

        def reset(self):
            self.inner.reset()
            self.k = 0
            apply_knobs(self.inner, schedule[0])

        def dispatch(self, call, cluster):
            return self.inner.dispatch(call, cluster)

        def queue_key(self, call, engine):
            return self.inner.queue_key(call, engine)

        def on_interval(self, cluster):
            self.k += 1
            apply_knobs(self.inner, schedule[self.k])

    reference, _ = simulate(env.unwrapped.scenario.run_spec(6), Scheduled())
    assert _same_metrics(reference, info["metrics"]) == []
