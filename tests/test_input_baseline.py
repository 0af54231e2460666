"""Decima's input-dependent baseline (training/input_baseline.py): groups of envs replay one episode,
the baseline is the group's time-aligned mean return, and a run with it trains, saves and loads."""

from __future__ import annotations

import numpy as np
import pytest

from envs.sim.scenario import workload_for
from training.config import TrainConfig
from training.input_baseline import InputBaselineMaskablePPO, return_at, returns_to_go, time_aligned_baselines

SCENARIOS = [{"trace": "chess_trace1", "cluster": "paper", "queries": 6, "rate_qps": 0.2},
             {"trace": "chess_trace1", "cluster": "mixed-16", "queries": 6, "rate_qps": 1.0}]


def grouped_config(**overrides) -> TrainConfig:
    raw = {
        "name": "input-baseline", "env_id": "agentsched/Dispatch-v1", "algo": "maskable_ppo",
        "policy": "EngineScoringPolicy", "total_timesteps": 300, "n_envs": 4, "vec_env": "dummy",
        "scenarios": SCENARIOS, "env_kwargs": {"max_engines": 12, "differential": True},
        "hyperparams": {"n_steps": 64, "batch_size": 32, "n_epochs": 1, "learning_rate": 1e-4},
        "eval": {"freq_steps": 10_000, "seeds": [100_000], "baseline": None,
                 "scenarios": [SCENARIOS[0]]},
        "checkpoint_freq_steps": None, "baseline": "input_dependent", "rollouts_per_input": 2,
    }
    raw.update(overrides)
    return TrainConfig.parse(raw)


def test_returns_to_go_discount_per_decision():
    np.testing.assert_allclose(returns_to_go(np.array([1.0, 0.0, 2.0]), 0.5), [1.5, 1.0, 2.0])


def test_baseline_of_two_rollouts_by_hand():
    """Rollout A decides at t = 0, 10, 20 with rewards 1, 2, 3; rollout B at t = 0, 5, 30 with
    rewards 4, 0, 2 (gamma 1). Returns to go: A = 6, 5, 3; B = 6, 2, 2.
    B's return at A's times: 6 (t=0), 2 (t=10: between 5 and 30, both 2), 2 (t=20).
    A's return at B's times: 6 (t=0), 5.5 (t=5: halfway from 6 to 5), 3 (t=30: after A's last).
    Baselines: A = (6+6)/2, (5+2)/2, (3+2)/2 = 6, 3.5, 2.5; B = 6, (5.5+2)/2, (3+2)/2 = 6, 3.75, 2.5.
    Advantages: A = 0, 1.5, 0.5; B = 0, -1.75, -0.5."""
    times = [np.array([0.0, 10.0, 20.0]), np.array([0.0, 5.0, 30.0])]
    returns = [returns_to_go(np.array([1.0, 2.0, 3.0]), 1.0), returns_to_go(np.array([4.0, 0.0, 2.0]), 1.0)]
    np.testing.assert_allclose(returns[0], [6, 5, 3])
    np.testing.assert_allclose(returns[1], [6, 2, 2])
    base_a, base_b = time_aligned_baselines(times, returns)
    np.testing.assert_allclose(base_a, [6, 3.5, 2.5])
    np.testing.assert_allclose(base_b, [6, 3.75, 2.5])
    np.testing.assert_allclose(returns[0] - base_a, [0, 1.5, 0.5])
    np.testing.assert_allclose(returns[1] - base_b, [0, -1.75, -0.5])


def test_return_at_several_decisions_at_one_time_takes_the_first():
    """Three decisions at t=4 (returns 9, 8, 7): at t=4 the return from that time is 9 (every decision
    at it counts); just after, the interpolation starts from the last one's 7."""
    times, returns = np.array([0.0, 4.0, 4.0, 4.0, 8.0]), np.array([10.0, 9.0, 8.0, 7.0, 3.0])
    np.testing.assert_allclose(return_at(times, returns, np.array([-1.0, 2.0, 4.0, 6.0, 9.0])), [10, 9.5, 9, 5, 3])


def test_grouped_envs_replay_the_same_episode():
    """Each group of rollouts_per_input envs gets one seed and one scenario: identical run specs and
    arrival sequences within a group, different ones across groups; a fresh draw every iteration."""
    from training.envs import make_vec_env, scenario_index

    cfg = grouped_config(n_envs=6, rollouts_per_input=3)
    assert [scenario_index(cfg, r) for r in range(6)] == [0, 0, 0, 1, 1, 1]
    venv = make_vec_env(cfg)
    try:
        model = InputBaselineMaskablePPO("MlpPolicy", venv, rollouts_per_input=3, n_steps=16, device="cpu")
        draws = []
        for _ in range(2):
            seeds = model.reset_groups(venv)
            specs = venv.get_attr("run_spec")
            arrivals = [workload_for(s)[1] for s in specs]
            for g in (0, 3):
                assert seeds[g] == seeds[g + 1] == seeds[g + 2]
                assert specs[g] == specs[g + 1] == specs[g + 2]
                for j in (1, 2):
                    np.testing.assert_array_equal(arrivals[g], arrivals[g + j])
                assert [e.name for e in venv.envs[g].unwrapped.simulator.engines] == \
                       [e.name for e in venv.envs[g + 1].unwrapped.simulator.engines]
            assert specs[0].cluster != specs[3].cluster
            assert not np.array_equal(arrivals[0], arrivals[3])
            draws.append(seeds)
        assert draws[0][0] != draws[1][0]
    finally:
        venv.close()


def test_config_refuses_groups_that_do_not_fit():
    from envs.sim.errors import UserError

    with pytest.raises(UserError, match="n_envs"):
        grouped_config(n_envs=3)
    with pytest.raises(UserError, match="n_envs"):
        grouped_config(n_envs=2)  # one group for two scenarios
    with pytest.raises(UserError, match="input_dependent needs algo maskable_ppo"):
        grouped_config(env_id="agentsched/Knobs-v0", algo="ppo", env_kwargs={})
    assert TrainConfig.parse({}).baseline == "value"


def test_input_baseline_training_runs_saves_and_loads(tmp_path):
    """A few hundred steps with baseline input_dependent: whole episodes per iteration, advantages
    from the groups, the policy directory loads and acts like the model it was saved from."""
    import csv

    from envs.sim.scenario import RunSpec, simulate
    from policies import load_policy
    from training.train import train

    summary = train(grouped_config(), tmp_path, progress=False)
    assert summary["eval_history"][-1]["timesteps"] >= 300
    rows = list(csv.DictReader(open(tmp_path / "tb" / "progress.csv")))
    used = [r for r in rows if r.get("train/adv_std_input")]
    assert used and all(float(r["rollout/input_seeds"]) == 2 for r in used)
    assert all(float(r["train/adv_std_input"]) > 0 for r in used)
    spec = RunSpec(cluster="paper", rate_qps=0.2, queries=5, seed=200_000)
    a, b = load_policy(tmp_path / "final_policy"), load_policy(tmp_path / "final_policy")
    run_a, run_b = simulate(spec, a)[1], simulate(spec, b)[1]
    assert [c.engine_id for c in run_a.calls] == [c.engine_id for c in run_b.calls]
    assert run_a.calls
