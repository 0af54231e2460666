"""Gymnasium envs: API conformance (both checkers), determinism, masks, invalid actions, and the
equivalence of heuristics run through the env with `agentsched simulate`."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers the envs)
from envs.gym import InvalidActionError, Scenario
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


def test_return_counts_slo_met_workflows():
    """With no tardiness weight and no rejections, the undiscounted return is the number of
    workflows that met their SLO."""
    env = _make(scenario={"queries": 20, "rate_qps": 0.05}, tardiness_weight=0.0)
    obs, info = env.reset(seed=3)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        total += reward
        done = terminated or truncated
    met = info["metrics"]["slo_attainment"] * info["metrics"]["n_workflows"]
    assert total == pytest.approx(met - info["metrics"]["n_failed"] * 0)  # no rejections on the paper cluster


def test_scenario_run_spec_is_deterministic_and_randomized():
    scenario = Scenario.model_validate(RANDOMIZED)
    a, b = scenario.run_spec(4), scenario.run_spec(4)
    assert a == b
    specs = [scenario.run_spec(s) for s in range(20)]
    assert len({round(s.rate_qps, 9) for s in specs}) == 20
    assert {len(s.cluster_config().expanded()) for s in specs} <= set(range(2, 7))
    assert all(0.02 <= s.rate_qps <= 0.3 and 1.5 <= s.slo_scale <= 6.0 for s in specs)
