"""Building the vectorised training envs from a `TrainConfig`."""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np

from training.config import DISPATCH_ENV_ID, DISPATCH_ENV_IDS, TrainConfig


class RemapInvalidAction(gym.Wrapper):
    """For algorithms without action masking (plain PPO on Dispatch-v0): an invalid action (padding,
    engine down) is replaced by a uniformly random valid one and costs `penalty`.

    The env itself refuses invalid actions on purpose; this wrapper makes the remap explicit, and
    the penalty teaches the network to stop proposing masked engines. MaskablePPO never needs it.
    """

    def __init__(self, env: gym.Env, penalty: float = 0.1):
        super().__init__(env)
        self.penalty = float(penalty)
        self._mask = np.ones(env.action_space.n, dtype=np.int8)

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        self._mask = info["action_mask"]
        return obs, info

    def step(self, action: Any):
        a = int(np.asarray(action).reshape(()))
        penalty = 0.0
        if not self._mask[a]:
            valid = np.flatnonzero(self._mask)
            a = int(self.np_random.choice(valid))
            penalty = self.penalty
        obs, reward, terminated, truncated, info = self.env.step(a)
        self._mask = info["action_mask"]
        return obs, reward - penalty, terminated, truncated, info


def max_engines_for(config: TrainConfig) -> int:
    """The padding every env of the run uses: the config's, or the largest scenario cluster."""
    if "max_engines" in config.env_kwargs:
        return int(config.env_kwargs["max_engines"])
    return max(s.max_engines() for s in config.scenario_objects())


def env_kwargs_for(config: TrainConfig, scenario: Any) -> dict[str, Any]:
    kwargs = dict(config.env_kwargs)
    kwargs["scenario"] = scenario
    if config.env_id in DISPATCH_ENV_IDS:
        kwargs["max_engines"] = max_engines_for(config)
    return kwargs


def scenario_index(config: TrainConfig, rank: int) -> int:
    """Which of `config.scenarios` env `rank` draws episodes from: `rank % len(scenarios)`; with the
    input-dependent baseline, the group's (`rank // rollouts_per_input`), so the envs that replay
    one episode seed (training.input_baseline) share the scenario and thus the whole episode."""
    if config.baseline == "input_dependent":
        return (rank // config.rollouts_per_input) % len(config.scenarios)
    return rank % len(config.scenarios)


def make_env(config: TrainConfig, rank: int, seed: int, monitor: bool = True) -> Callable[[], gym.Env]:
    """A thunk building env `rank` (picklable for SubprocVecEnv), on scenario `scenario_index`."""
    scenario = config.scenarios[scenario_index(config, rank)]

    def _init() -> gym.Env:
        import envs.gym  # noqa: F401  (registers the env ids)

        env = gym.make(config.env_id, **env_kwargs_for(config, scenario))
        if config.env_id == DISPATCH_ENV_ID and config.algo == "ppo":
            env = RemapInvalidAction(env)
        if monitor:
            from stable_baselines3.common.monitor import Monitor

            env = Monitor(env)
        env.reset(seed=seed + rank)
        env.action_space.seed(seed + rank)
        return env

    return _init


def make_vec_env(config: TrainConfig, seed: int | None = None) -> Any:
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    seed = config.seed if seed is None else seed
    thunks = [make_env(config, i, seed) for i in range(config.n_envs)]
    if config.vec_env == "subproc" and config.n_envs > 1:
        return SubprocVecEnv(thunks, start_method="forkserver")
    return DummyVecEnv(thunks)


def make_single_env(config: TrainConfig, scenario_index: int = 0) -> gym.Env:
    """One raw env (no Monitor, no remap) for data collection and checks."""
    import envs.gym  # noqa: F401

    return gym.make(config.env_id, **env_kwargs_for(config, config.scenarios[scenario_index]))
