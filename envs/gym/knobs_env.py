"""`agentsched/Knobs-v0`: learned tuning of the paper's hierarchical heuristic.

Every control interval (default 30 simulated seconds) the agent sets the knobs of the heuristic
(by default HexGen's: `alpha` of the workload-balanced dispatcher, `weight` of the urgency order);
the heuristic then answers every dispatch decision of the interval. A policy that adapts the
paper's knobs as load shifts is what this env learns; a constant action is the tuned heuristic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from pydantic import BaseModel, ConfigDict, model_validator

from envs.gym.dispatch_env import InvalidActionError, episode_for, metrics_of_episode, render_text
from envs.gym.observation import (INV_RATE_SCALE, INV_TIME_SCALE, OBS_CLIP, _count)
from envs.gym.reward import COMPLETION_BONUS, REJECTION_PENALTY, TARDINESS_WEIGHT, SLOReward
from envs.gym.scenario import Scenario, resolve_cluster
from envs.sim.catalog import load_catalog
from envs.sim.cluster import ClusterSimulator, Workflow
from envs.sim.scenario import RunSpec, build_simulator

# Simulated seconds between knob decisions: a few CHESS calls' worth, short against an SLO of a
# few minutes, long enough for a knob change to show in queues.
DEFAULT_CONTROL_INTERVAL_S = 30.0
# Burstiness (CV of inter-arrival gaps) is measured over this trailing window of arrivals.
BURSTINESS_WINDOW_S = 300.0
# Fewer gaps than this in the window: report CV 1 (what a Poisson process would give).
MIN_GAPS_FOR_CV = 3


class Knob(BaseModel):
    """One knob of the heuristic, set from one action dimension in [-1, 1] mapped linearly to
    [low, high]."""

    model_config = ConfigDict(extra="forbid")
    name: str
    layer: Literal["dispatch", "local"]
    low: float
    high: float

    @model_validator(mode="after")
    def _range(self) -> "Knob":
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"knob {self.name}: need low < high, got [{self.low}, {self.high}]")
        return self


DEFAULT_KNOBS = (Knob(name="alpha", layer="dispatch", low=0.0, high=1.0),
                 Knob(name="weight", layer="local", low=0.0, high=1.0))

# Bumped whenever features, their order, units or scaling change (trained policies record it).
OBS_VERSION = 2  # 2: slack and budget statistics asinh/log1p-scaled

GLOBAL_FEATURES: tuple[str, ...] = (
    "arrival_rate_window", "arrival_rate_interval", "burstiness_cv", "attainment_so_far", "interval_finished", "interval_attainment", "in_flight", "in_flight_late_share",
    "slack_mean", "slack_min", "budget_used_mean")
GPU_TYPE_FEATURES: tuple[str, ...] = ("engines", "healthy_share", "waiting", "running", "outstanding_work",
                                      "kv_usage_mean")


class KnobsObservation:
    """The Knobs-v0 observation, from any `ClusterView` (simulator or deploy gateway): it reads
    `workflows` (every arrived workflow, with `done`), `finished_workflows` and `met_workflows`
    besides engine state, so a trained knob policy runs through `Policy.on_interval` anywhere.
    Engines whose `gpu` label is not a catalog type (e.g. local CPU engines) have no per-type
    slot and are left out of the per-type features.

    `reset(sim)` per episode, `start_interval(sim)` when new knobs take effect, `build(sim, knob_action)`
    at the end of the interval.
    """

    def __init__(self, n_knobs: int):
        catalog = load_catalog()
        self.n_knobs = n_knobs
        self.gpu_types = list(catalog.gpus)
        self._gpu_index = {g: i for i, g in enumerate(self.gpu_types)}
        for g, spec in catalog.gpus.items():
            for alias in spec.aliases:
                self._gpu_index.setdefault(alias, self._gpu_index[g])
        self.size = len(GLOBAL_FEATURES) + n_knobs + len(self.gpu_types) * len(GPU_TYPE_FEATURES)
        self.names = ([f"global.{f}" for f in GLOBAL_FEATURES] + [f"knob[{i}]" for i in range(n_knobs)]
                      + [f"gpu[{g}].{f}" for g in self.gpu_types for f in GPU_TYPE_FEATURES])

    def reset(self, sim: Any) -> None:
        self._in_flight: list[Workflow] = []
        self._registered = 0
        self.start_interval(sim)

    def start_interval(self, sim: Any) -> None:
        self._interval_start_s = sim.now_s
        self._arrivals_at_start = len(sim.workflows)
        self._finished_at_start = sim.finished_workflows
        self._met_at_start = sim.met_workflows

    def build(self, sim: Any, knob_action: np.ndarray) -> np.ndarray:
        now = sim.now_s
        clip = OBS_CLIP
        workflows = sim.workflows
        for i in range(self._registered, len(workflows)):
            self._in_flight.append(workflows[i])
        self._registered = len(workflows)
        self._in_flight = [w for w in self._in_flight if not w.done]
        # arrivals: rate over the last interval, burstiness over a trailing window
        interval_s = max(now - self._interval_start_s, 1e-9)
        interval_rate = (len(workflows) - self._arrivals_at_start) / interval_s
        times = []
        for w in reversed(workflows):
            if w.arrival_time_s < now - BURSTINESS_WINDOW_S:
                break
            times.append(w.arrival_time_s)
        cv = 1.0
        if len(times) > MIN_GAPS_FOR_CV:
            gaps = -np.diff(np.asarray(times))
            mean = gaps.mean()
            cv = float(gaps.std() / mean) if mean > 0 else clip
        finished = sim.finished_workflows - self._finished_at_start
        met = sim.met_workflows - self._met_at_start
        in_flight = self._in_flight
        if in_flight:
            slack = np.array([(w.deadline_s - now) / w.slo_s for w in in_flight])
            used = np.array([(now - w.arrival_time_s) / w.slo_s for w in in_flight])
            late_share = float((slack < 0).mean())
            # in SLO units; asinh/log1p keep overload (workflows late by many SLOs) within a few units
            slack_mean, slack_min = math.asinh(float(slack.mean())), math.asinh(float(slack.min()))
            used_mean = math.log1p(max(0.0, float(used.mean())))
        else:
            late_share, slack_mean, slack_min, used_mean = 0.0, math.asinh(1.0), math.asinh(1.0), 0.0
        head = [sim.recent_arrival_rate_qps * INV_RATE_SCALE, interval_rate * INV_RATE_SCALE, cv,
                sim.slo_attainment_so_far, _count(finished), met / finished if finished else 1.0,
                _count(len(in_flight)), late_share, slack_mean, slack_min, used_mean]
        head.extend(float(x) for x in knob_action)
        per_type = np.zeros((len(self.gpu_types), len(GPU_TYPE_FEATURES)))
        for e in sim.engines:
            index = self._gpu_index.get(e.gpu)
            if index is None:
                continue
            row = per_type[index]
            row[0] += 1
            row[1] += e.healthy
            row[2] += e.num_waiting
            row[3] += e.num_running
            row[4] += e.outstanding_work_s
            row[5] += e.kv_usage
        count = np.maximum(per_type[:, 0], 1.0)
        per_type[:, 1] /= count
        per_type[:, 5] /= count
        per_type[:, 4] *= INV_TIME_SCALE
        per_type[:, [0, 2, 3, 4]] = np.log1p(per_type[:, [0, 2, 3, 4]])
        obs = np.concatenate([np.asarray(head, dtype=np.float64), per_type.ravel()])
        return np.clip(obs, -clip, clip).astype(np.float32)


def knob_values(knobs: Sequence[Knob], action: Any) -> dict[str, float]:
    """Knob values of an action in [-1, 1]^len(knobs): dimension i maps linearly to knobs[i]'s range."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    return {k.name: k.low + (float(x) + 1.0) * 0.5 * (k.high - k.low) for k, x in zip(knobs, a)}


def knob_action(knobs: Sequence[Knob], values: dict[str, float]) -> np.ndarray:
    """The action in [-1, 1]^len(knobs) that sets these values (all knobs must be given)."""
    return np.clip(np.array([2.0 * (values[k.name] - k.low) / (k.high - k.low) - 1.0 for k in knobs],
                            dtype=np.float32), -1.0, 1.0)


def _coerce_knobs(knobs: Sequence[Knob | dict] | None) -> list[Knob]:
    return [k if isinstance(k, Knob) else Knob.model_validate(k) for k in (knobs or DEFAULT_KNOBS)]


@dataclass
class KnobsState:
    """What a knob policy outside the env carries between intervals (see `knobs_observation`)."""

    observer: KnobsObservation
    knobs: list[Knob]
    action: np.ndarray  # the knobs in force, as an action in [-1, 1]


def knobs_observation(cluster: Any, state: KnobsState | None = None, *, knobs: Sequence[Knob | dict] | None = None,
                      policy: str = "hexgen", **_env_kwargs: Any) -> tuple[np.ndarray, KnobsState]:
    """Knobs-v0's observation from a simulator-like cluster, for a trained knob policy's
    `on_interval(cluster)` inside `simulate`: `obs, state = knobs_observation(cluster, state, **env_kwargs)`
    then `apply_knobs(heuristic, action, state=state)`. The first call (state None) starts the
    first interval now, with `policy`'s default knobs in force. Other env keyword arguments
    (scenario, control_interval_s, ...) are accepted and ignored."""
    if state is None:
        from policies.heuristic import HeuristicPolicy

        ks = _coerce_knobs(knobs)
        base = HeuristicPolicy.named(policy)
        defaults = {**base.dispatcher.get_knobs(), **base.local.get_knobs()}
        state = KnobsState(KnobsObservation(len(ks)), ks, knob_action(ks, {k.name: float(defaults[k.name]) for k in ks}))
        state.observer.reset(cluster)
    obs = state.observer.build(cluster, state.action)
    state.observer.start_interval(cluster)
    return obs, state


def apply_knobs(heuristic: Any, action: Any, knobs: Sequence[Knob | dict] | None = None,
                state: KnobsState | None = None) -> dict[str, float]:
    """Set a `HeuristicPolicy`'s knobs from an action (clipped to [-1, 1]: outside the env a policy
    should degrade, not fail); returns the values set. With `state`, its knobs are used and the
    action is remembered for the next observation."""
    ks = state.knobs if state is not None else _coerce_knobs(knobs)
    a = np.clip(np.nan_to_num(np.asarray(action, dtype=np.float64).reshape(-1), nan=0.0), -1.0, 1.0)
    if a.shape != (len(ks),):
        raise InvalidActionError(f"action must have {len(ks)} values (one per knob), got shape {np.shape(action)}")
    values = knob_values(ks, a)
    for k in ks:
        target = heuristic.dispatcher if k.layer == "dispatch" else heuristic.local
        if k.name not in target.get_knobs():
            from policies.base import PolicyError

            raise PolicyError(f"knobs: {type(target).__name__} has no knob {k.name!r}")
        setattr(target, k.name, values[k.name])
    if state is not None:
        state.action = a.astype(np.float32)
    return values


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
        from heuristics import registry

        # other render modes (SB3's make_vec_env asks for "rgb_array") are accepted and render nothing
        self.render_mode = render_mode
        from policies.base import PolicyError

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
        from policies.heuristic import HeuristicPolicy

        base = HeuristicPolicy.named(self.policy_name)
        found = {**base.dispatcher.get_knobs(), **base.local.get_knobs()}
        missing = [k.name for k in self.knobs if k.name not in found]
        if missing:
            from policies.base import PolicyError

            raise PolicyError(f"knobs: policy {self.policy_name!r} has no knob {missing[0]!r} "
                              f"(knobs: {', '.join(found) or 'none'})")
        return {k.name: float(found[k.name]) for k in self.knobs}

    def _build_policy(self, action: np.ndarray) -> Any:
        from policies.heuristic import HeuristicPolicy

        values = self.knobs_for(action)
        d = {**self._named.dispatch_knobs, **{k.name: values[k.name] for k in self.knobs if k.layer == "dispatch"}}
        l = {**self._named.local_knobs, **{k.name: values[k.name] for k in self.knobs if k.layer == "local"}}
        return HeuristicPolicy.build(self._named.dispatch, self._named.local, d, l, name=self.policy_name)

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
