"""MaskablePPO with Decima's input-dependent baseline instead of the learned value function.

Why: in a scheduling env most of the spread of a return comes from the input (when workflows
arrive, how long their outputs are), not from the agent's decisions. A state-value function sees
only the current state, so an episode whose burst is still to come looks like a bad policy to it.
An input-dependent baseline (Mao et al., "Variance Reduction for Reinforcement Learning in
Input-Driven Environments", ICLR 2019, arXiv 1807.02264; used by Decima, arXiv 1810.01963) runs
several rollouts on the *same* input and measures each against their mean, so the input's share
of the variance cancels. decima-sim (github.com/hongzimao/decima-sim, `train.py` and
`compute_baselines.py::get_piecewise_linear_fit_baseline`) does it like this, and so does this
class:

- The envs of the VecEnv form groups of `rollouts_per_input` consecutive envs (env i is in group
  i // rollouts_per_input; `training.envs` gives a group's envs the same scenario). Every
  iteration starts with each group's first env drawing a fresh episode seed from its scenario
  and every env of the group resetting on that seed: same arrivals, workflows, output lengths,
  cluster and load. Every env then runs exactly one whole episode; an env whose episode ends
  before the others' keeps being stepped by the VecEnv, and those steps are discarded (they count
  in `num_timesteps`, since they cost simulation; `rollout/discarded_steps`). The config's `n_steps`
  plays no part: an iteration's size is the episodes' length (set it with the scenario's
  `queries`, the curriculum, or `horizon_s`, which is Decima's `max_time` reset).
- The return to go of step k is the discounted sum of the episode's rewards from step k on
  (gamma per decision, as decima-sim's `discount`); whole episodes, so nothing is bootstrapped,
  also not at a `horizon_s` truncation, which every rollout of a group hits at the same time.
- The baseline of a step taken at simulated time t is the mean over the group's rollouts of each
  one's return to go at t, linearly interpolated between its own decision times and held constant
  beyond its first and last (decima-sim's rule, the rollout itself included). Decisions of
  different rollouts happen at different simulated times, which is why the env's
  `info["sim_time_s"]` is needed. One difference from decima-sim: it files a step's return under
  the time after the step, this class under the time of the decision (the return from time t).
- advantage = return to go - baseline. The value head still regresses the return to go, so it
  stays usable (and `train/adv_std_value` shows what its advantages would have spread), but it
  plays no part in the policy gradient.

The saved model is a plain MaskablePPO model.zip (the baseline only changes how training data are
weighted), so every loader of trained policies reads it unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.buffers import MaskableRolloutBuffer
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper


def returns_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_k = sum_{j >= k} gamma^(j-k) r_j for one whole episode."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for k in range(len(rewards) - 1, -1, -1):
        running = float(rewards[k]) + gamma * running
        out[k] = running
    return out


def return_at(times_s: np.ndarray, returns: np.ndarray, at_s: np.ndarray) -> np.ndarray:
    """One rollout's return to go at the simulated times `at_s`: linear between its decision times
    `times_s` (non-decreasing), its first value before them, its last after them. At a time with
    several decisions, the first one's (the return from that time, every decision at it included),
    as decima-sim's bisect_left."""
    n = len(times_s)
    idx = np.searchsorted(times_s, at_s, side="left")
    hi = np.minimum(idx, n - 1)
    lo = np.maximum(idx - 1, 0)
    span = times_s[hi] - times_s[lo]
    frac = np.divide(at_s - times_s[lo], span, out=np.ones_like(at_s, dtype=np.float64), where=span > 0)
    frac = np.clip(frac, 0.0, 1.0)
    return returns[lo] + frac * (returns[hi] - returns[lo])


def time_aligned_baselines(times_s: list[np.ndarray], returns: list[np.ndarray]) -> list[np.ndarray]:
    """For each rollout of one group, at each of its decision times: the mean over the group's
    rollouts (itself included) of their return to go at that time. Empty rollouts are skipped."""
    pairs = [(t, g) for t, g in zip(times_s, returns) if len(t)]
    out = []
    for t in times_s:
        if not len(t):
            out.append(np.zeros(0))
            continue
        out.append(np.mean([return_at(tj, gj, t) for tj, gj in pairs], axis=0))
    return out


def _base_vec_env(env: VecEnv) -> VecEnv:
    """The innermost VecEnv: wrappers (VecNormalize) keep their own empty `reset_infos`."""
    while isinstance(env, VecEnvWrapper):
        env = env.venv
    return env


class InputBaselineMaskablePPO(MaskablePPO):
    """MaskablePPO whose advantages come from an input-dependent baseline (module docstring).
    `rollouts_per_input` envs share each input; the VecEnv's `num_envs` must be a multiple of it,
    and the envs must be Dispatch envs (their reset info carries `episode_seed`, every info
    `sim_time_s`, and `reset(options={"episode_seed": s})` replays an episode)."""

    def __init__(self, policy: Any, env: Any, rollouts_per_input: int = 2, **kwargs: Any):
        self.rollouts_per_input = int(rollouts_per_input)
        if self.rollouts_per_input < 2:
            raise ValueError("rollouts_per_input must be at least 2 (a baseline needs other rollouts on the same input)")
        super().__init__(policy, env, **kwargs)
        if self.env is not None and self.env.num_envs % self.rollouts_per_input:
            raise ValueError(f"n_envs ({self.env.num_envs}) must be a multiple of rollouts_per_input "
                             f"({self.rollouts_per_input})")

    # ---- one iteration: each group on one input, one episode per env ------------------------------
    def reset_groups(self, env: VecEnv) -> list[int]:
        """Start an episode in every env: each group's first env draws the seed (from its own RNG,
        in its scenario's seed range), the whole group resets on it. Returns the seed per env."""
        k = self.rollouts_per_input
        leaders = list(range(0, env.num_envs, k))
        drawn = env.env_method("reset", indices=leaders)
        seeds = [int(drawn[i // k][1]["episode_seed"]) for i in range(env.num_envs)]
        env.set_options([{"episode_seed": s} for s in seeds])
        self._last_obs = env.reset()
        self._last_episode_starts = np.ones(env.num_envs, dtype=bool)
        return seeds

    def collect_rollouts(self, env: VecEnv, callback: BaseCallback, rollout_buffer: Any, n_rollout_steps: int,
                         use_masking: bool = True) -> bool:
        """One whole episode per env, then the buffer (one column of every kept transition) with
        advantages against the group's time-aligned mean. `n_rollout_steps` is not used."""
        self.policy.set_training_mode(False)
        callback.on_rollout_start()  # the curriculum sets the episode length here, before the resets
        seeds = self.reset_groups(env)
        n_envs = env.num_envs
        reset_infos = _base_vec_env(env).reset_infos
        steps: list[dict[str, list]] = [{"obs": [], "action": [], "reward": [], "value": [], "log_prob": [], "mask": [],
                                         "time_s": [float(reset_infos[i]["sim_time_s"])]} for i in range(n_envs)]
        active = np.ones(n_envs, dtype=bool)
        discarded = 0
        while active.any():
            with th.no_grad():
                action_masks = get_action_masks(env)
                actions, values, log_probs = self.policy(obs_as_tensor(self._last_obs, self.device),
                                                         action_masks=action_masks)
            actions = actions.cpu().numpy()
            new_obs, rewards, dones, infos = env.step(actions)
            self.num_timesteps += n_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            live = np.flatnonzero(active)
            discarded += n_envs - len(live)
            self._update_info_buffer([infos[i] for i in live], dones[live])
            for i in live:
                s = steps[i]
                s["obs"].append(self._last_obs[i])
                s["action"].append(actions[i])
                s["reward"].append(rewards[i])
                s["value"].append(float(values[i]))
                s["log_prob"].append(float(log_probs[i]))
                s["mask"].append(action_masks[i])
                if dones[i]:
                    active[i] = False
                else:
                    s["time_s"].append(float(infos[i]["sim_time_s"]))
            self._last_obs = new_obs
            self._last_episode_starts = dones

        returns = [returns_to_go(np.asarray(s["reward"]), self.gamma) for s in steps]
        baselines: list[np.ndarray] = []
        k = self.rollouts_per_input
        for g in range(0, n_envs, k):
            baselines += time_aligned_baselines([np.asarray(s["time_s"]) for s in steps[g:g + k]], returns[g:g + k])
        self.rollout_buffer = self._buffer_of(steps, returns, baselines)
        values_all = np.concatenate([s["value"] for s in steps])
        returns_all = np.concatenate(returns)
        self.logger.record("rollout/input_seeds", len(set(seeds)))
        self.logger.record("rollout/discarded_steps", discarded)
        self.logger.record("rollout/episode_steps_mean", float(np.mean([len(s["reward"]) for s in steps])))
        self.logger.record("train/adv_std_input", float(np.std(returns_all - np.concatenate(baselines))))
        self.logger.record("train/adv_std_value", float(np.std(returns_all - values_all)))
        callback.on_rollout_end()
        return True

    def _buffer_of(self, steps: list[dict[str, list]], returns: list[np.ndarray],
                   baselines: list[np.ndarray]) -> MaskableRolloutBuffer:
        """A rollout buffer with one column holding every episode back to back, advantages and
        returns filled in (PPO's `train` samples minibatches from it as from any buffer)."""
        total = sum(len(s["reward"]) for s in steps)
        buf = MaskableRolloutBuffer(total, self.observation_space, self.action_space, self.device,
                                    gamma=self.gamma, gae_lambda=self.gae_lambda, n_envs=1)

        def column(key: str) -> np.ndarray:
            return np.concatenate([np.asarray(s[key], dtype=np.float32).reshape(len(s[key]), -1) for s in steps if s[key]])

        buf.observations[:, 0] = column("obs").reshape((total, *buf.obs_shape))
        buf.actions[:, 0] = column("action")
        buf.rewards[:, 0] = column("reward")[:, 0]
        buf.values[:, 0] = column("value")[:, 0]
        buf.log_probs[:, 0] = column("log_prob")[:, 0]
        buf.action_masks[:, 0] = column("mask")
        starts = np.zeros(total, dtype=np.float32)
        starts[np.cumsum([0] + [len(s["reward"]) for s in steps])[:-1]] = 1.0
        buf.episode_starts[:, 0] = starts
        buf.returns[:, 0] = np.concatenate(returns)
        buf.advantages[:, 0] = np.concatenate(returns) - np.concatenate(baselines)
        buf.pos, buf.full = total, True
        return buf
