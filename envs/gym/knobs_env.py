"""`agentsched/Knobs-v0`: learned tuning of the paper's hierarchical heuristic.

Every control interval (default 30 simulated seconds) the agent sets the knobs of the heuristic
(by default HexGen's: `alpha` of the workload-balanced dispatcher, `weight` of the urgency order);
the heuristic then answers every dispatch decision of the interval. A policy that adapts the
paper's knobs as load shifts is what this env learns; a constant action is the tuned heuristic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.gym.dispatch_env import episode_for, metrics_of_episode, render_text
from envs.gym.reward import COMPLETION_BONUS, REJECTION_PENALTY, TARDINESS_WEIGHT, SLOReward
from envs.gym.scenario import Scenario, resolve_cluster
from envs.observation import InvalidActionError
from envs.observation.dispatch import OBS_CLIP
from envs.observation.knobs import (
    DEFAULT_CONTROL_INTERVAL_S,
    GLOBAL_FEATURES,
    Knob,
    KnobsObservation,
    _coerce_knobs,
    knob_action,
    knob_values,
)
from envs.sim.cluster import ClusterSimulator
from envs.sim.scenario import RunSpec, build_simulator
from heuristics import registry
from policies.base import PolicyError
from policies.heuristic import HeuristicPolicy


class KnobsEnv(gym.Env[np.ndarray, np.ndarray]):
    """Set the hierarchical heuristic's knobs for the next control interval.

    Action: `Box(-1, 1, (len(knobs),), float32)`; dimension i sets `knobs[i]` to
    low + (a + 1) / 2 x (high - low) (SB3 convention: a symmetric, normalised box). Defaults:
    HexGen's `alpha` (0: balance work only, 1: fastest engine only) and the urgency order's
    `weight` (0: FCFS, 1: pure urgency). A new local weight applies to calls queued from then on.
    **An action outside the box, of the wrong shape or not finite raises `InvalidActionError`**
    (SB3's PPO clips to the box before stepping, so this only catches real bugs).

    Observation (`KnobsObservation`): `Box(-OBS_CLIP, OBS_CLIP)`: arrival rate (trailing minute and
    last interval), burstiness (CV of inter-arrival gaps), attainment so far and of the last
    interval, in-flight workflows and their slack statistics (slack in units of each workflow's
    SLO), the knobs in force, then per GPU type of the catalog (a fixed order, so clusters of any
    mix share one layout): engines, healthy share, waiting and running calls, outstanding work,
    mean KV use.

    Reward: the SLO reward of `envs.gym.reward`, accumulated over the interval. Episode and
    `info["metrics"]` as in Dispatch-v0.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, scenario: Scenario | dict | str | Path | None = None, policy: str = "hexgen",
                 knobs: list[Knob | dict] | None = None, control_interval_s: float = DEFAULT_CONTROL_INTERVAL_S,
                 completion_bonus: float = COMPLETION_BONUS, tardiness_weight: float = TARDINESS_WEIGHT,
                 rejection_penalty: float = REJECTION_PENALTY, episode_metrics: bool = True,
                 render_mode: str | None = None):
        # other render modes (SB3's make_vec_env asks for "rgb_array") are accepted and render nothing
        self.render_mode = render_mode

        self.scenario = Scenario.coerce(scenario)
        if policy not in registry.NAMED:
            raise PolicyError(f"policy: unknown policy name {policy!r} (known: {', '.join(registry.NAMED)})")
        if not control_interval_s > 0 or math.isinf(control_interval_s):
            raise ValueError(f"control_interval_s must be a positive number, got {control_interval_s}")
        self.policy_name = policy
        self._named = registry.NAMED[policy]
        self.knobs = _coerce_knobs(knobs)
        if not self.knobs:
            raise ValueError("knobs: give at least one knob")
        self.control_interval_s = float(control_interval_s)
        self.episode_metrics = bool(episode_metrics)
        self._observer = KnobsObservation(len(self.knobs))
        self.gpu_types = self._observer.gpu_types
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (self._observer.size,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (len(self.knobs),), np.float32)
        self._reward = SLOReward(completion_bonus, tardiness_weight, rejection_penalty)
        self._horizon_s = self.scenario.horizon_s or math.inf
        self._sim: ClusterSimulator | None = None
        self._spec: RunSpec | None = None
        self._policy = self._build_policy(self.action_for_knobs({}))  # validates the knob names
        self._done = True

    # ---- knobs <-> actions ------------------------------------------------------------------------
    def knobs_for(self, action: np.ndarray) -> dict[str, float]:
        """Knob values an (in-range) action sets."""
        return knob_values(self.knobs, action)

    def action_for_knobs(self, values: dict[str, float]) -> np.ndarray:
        """The action that sets these knob values (others: the policy's defaults)."""
        return knob_action(self.knobs, {**self._default_knobs(), **values})

    def _default_knobs(self) -> dict[str, float]:
        base = HeuristicPolicy.named(self.policy_name)
        found = {**base.dispatcher.get_knobs(), **base.local.get_knobs()}
        missing = [k.name for k in self.knobs if k.name not in found]
        if missing:
            raise PolicyError(f"knobs: policy {self.policy_name!r} has no knob {missing[0]!r} "
                              f"(knobs: {', '.join(found) or 'none'})")
        return {k.name: float(found[k.name]) for k in self.knobs}

    def _build_policy(self, action: np.ndarray) -> Any:
        values = self.knobs_for(action)
        d = {**self._named.dispatch_knobs, **{k.name: values[k.name] for k in self.knobs if k.layer == "dispatch"}}
        loc = {**self._named.local_knobs, **{k.name: values[k.name] for k in self.knobs if k.layer == "local"}}
        return HeuristicPolicy.build(self._named.dispatch, self._named.local, d, loc, name=self.policy_name)

    def policy_for(self, action: np.ndarray) -> Any:
        """The heuristic policy an action puts in force (e.g. to run a constant action in `simulate`)."""
        return self._build_policy(self._check_action(action))

    def _check_action(self, action: Any) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != self.action_space.shape:
            a = a.reshape(-1) if a.size == self.action_space.shape[0] else a
        if a.shape != self.action_space.shape:
            raise InvalidActionError(f"action must have shape {self.action_space.shape} (one value per knob: "
                                     f"{', '.join(k.name for k in self.knobs)}), got shape {np.shape(action)}")
        if not np.all(np.isfinite(a)):
            raise InvalidActionError(f"action must be finite, got {a.tolist()}")
        if np.any(a < -1.0) or np.any(a > 1.0):
            raise InvalidActionError(f"action {a.tolist()} is outside [-1, 1] (each dimension maps to a knob's range)")
        return a

    # ---- Gymnasium API ------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._spec, episode_seed = episode_for(self.scenario, self.np_random, options)
        self._knob_action = self.action_for_knobs({}).astype(np.float64)
        self._policy = self._build_policy(self._knob_action)
        self._policy.reset()
        # a parsed cluster instead of its name: the YAML is read once per process, not per episode
        self._sim = build_simulator(self._spec.model_copy(update={"cluster": resolve_cluster(self._spec.cluster)}),
                                    queue_key=self._policy.queue_key)
        self._reward.bind(self._sim)
        self._observer.reset(self._sim)
        self._done = False
        obs = self._observer.build(self._sim, self._knob_action)
        return obs, {"episode_seed": int(episode_seed), "knobs": self.knobs_for(self._knob_action)}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._done:
            raise RuntimeError("step() after the episode ended: call reset()")
        a = self._check_action(action)
        sim = self._sim
        self._knob_action = a
        policy = self._build_policy(a)
        self._policy = policy
        sim.queue_key = policy.queue_key
        self._observer.start_interval(sim)
        until = min(sim.now_s + self.control_interval_s, self._horizon_s)
        dispatch = policy.dispatch
        while True:
            call = sim.next_decision(until_s=until)
            if call is None:
                break
            sim.dispatch(call, dispatch(call, sim))
        reward = self._reward.update()
        terminated = sim.done
        truncated = not terminated and sim.now_s >= self._horizon_s
        info: dict[str, Any] = {"knobs": self.knobs_for(a)}
        if terminated or truncated:
            self._done = True
            if self.episode_metrics:
                info["metrics"] = self.metrics()
            info["run_spec"] = self._spec
        return self._observer.build(sim, a), reward, terminated, truncated, info

    def render(self) -> str | None:
        """`render_mode="ansi"`: one line of the simulator's state."""
        if self.render_mode != "ansi" or self._sim is None:
            return None
        return render_text(self._sim)

    # ---- helpers -----------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """The `agentsched simulate` metrics dict of the episode so far."""
        return metrics_of_episode(self._sim, self._spec, {"kind": "env", "name": "agentsched/Knobs-v0",
                                                       "policy": self.policy_name})

    def observation_names(self) -> list[str]:
        names = list(self._observer.names)
        for i, k in enumerate(self.knobs):
            names[len(GLOBAL_FEATURES) + i] = f"knob.{k.name}"
        return names

    @property
    def simulator(self) -> ClusterSimulator | None:
        return self._sim

    @property
    def run_spec(self) -> RunSpec | None:
        return self._spec
