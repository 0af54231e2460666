"""`agentsched/Dispatch-v0`: one decision per ready LLM call, which engine gets it.

The simulator stops whenever a call becomes ready; the action is the index of the engine that
gets it. Engines then order their queues with a fixed local heuristic (default: HexGen's urgency
order), so the agent learns the global layer of the paper's hierarchy and a heuristic dispatcher
runs through this env with exactly the decisions it makes in `simulate` (`heuristic_action`).
"""

from __future__ import annotations

import math
import operator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.gym.reward import COMPLETION_BONUS, REJECTION_PENALTY, TARDINESS_WEIGHT, SLOReward
from envs.gym.scenario import Scenario, resolve_cluster
from envs.observation import InvalidActionError
from envs.observation.dispatch import OBS_CLIP, OBS_VERSION, DispatchObservation
from envs.sim.cluster import ClusterSimulator
from envs.sim.engine import LLMCall
from envs.sim.metrics import records_from_simulator, summarize
from envs.sim.scenario import RunSpec, build_simulator
from policies.heuristic import resolve_local_order

# The local order engines use unless told otherwise: the paper's urgency (least slack first).
DEFAULT_LOCAL_ORDER = "urgency"



def metrics_of_episode(sim: ClusterSimulator, spec: RunSpec, policy_spec: dict[str, Any]) -> dict[str, Any]:
    """The metrics dict of `agentsched simulate` (`envs.sim.scenario.simulate`) for a finished episode."""
    wfs, calls, engines = records_from_simulator(sim)
    return summarize(wfs, calls, engines, sim_wall_s=sim.wall_s,
                     extra={"policy": policy_spec, "rate_qps": spec.rate_qps, "slo_scale": spec.slo_scale,
                            "seed": spec.seed, "trace": spec.trace,
                            "cluster": spec.cluster if isinstance(spec.cluster, str) else spec.cluster.name,
                            "base_slo_s": sim.slo.base_slo_s, "decisions": sim.decisions,
                            "prefix_cache": "on" if spec.prefix_cache else "off"})


def render_text(sim: ClusterSimulator) -> str:
    """One line: simulated time, workflows finished/met, and each engine's running/waiting calls."""
    engines = " ".join(f"{e.name}:{e.num_running}r{e.num_waiting}w{'' if e.healthy else '(down)'}" for e in sim.engines)
    return (f"t={sim.now_s:.1f}s workflows {len(sim.workflows)} arrived, {sim.finished_workflows} finished, "
            f"{sim.met_workflows} met SLO | {engines}")


def episode_for(scenario: Scenario, rng: np.random.Generator, options: dict[str, Any] | None) -> tuple[RunSpec, int]:
    """The episode a reset starts: `options["run_spec"]` (any `RunSpec`, e.g. from a benchmark),
    else `options["episode_seed"]`, else a seed drawn from `rng` in the scenario's range."""
    options = options or {}
    spec = options.get("run_spec")
    if spec is not None:
        spec = spec if isinstance(spec, RunSpec) else RunSpec.model_validate(spec)
        return spec, spec.seed
    seed = options.get("episode_seed")
    if seed is None:
        seed = scenario.draw_episode_seed(rng)
    return scenario.run_spec(int(seed)), int(seed)


class MaskedDiscrete(spaces.Discrete):
    """`Discrete(n)` whose `sample()` without a mask draws among the env's currently valid actions.

    Generic tools (both env checkers, random rollouts) step envs with `action_space.sample()`;
    with padded and failed engines masked, a plain uniform draw would hit invalid actions, which
    this env rejects. Membership (`contains`) is plain Discrete's. The space reads the mask that the
    env updates in place; a copy of the space in another process sees that process's env only.
    """

    def __init__(self, n: int, seed: int | None = None):
        super().__init__(n, seed=seed)
        self.current_mask: np.ndarray = np.ones(n, dtype=np.int8)
        self._valid: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # mask id -> (mask, valid indices)

    def sample(self, mask: np.ndarray | None = None, probability: np.ndarray | None = None) -> np.int64:
        if mask is None and probability is None:
            valid = self._valid.get(id(self.current_mask))
            if valid is None or valid[0] is not self.current_mask:
                valid = self._valid[id(self.current_mask)] = (self.current_mask, np.flatnonzero(self.current_mask))
            if len(valid[1]):
                return self.start + valid[1][self.np_random.integers(len(valid[1]))]
            return self.start  # nothing valid (no pending call): like Discrete.sample with an all-zero mask
        return super().sample(mask=mask, probability=probability)


class DispatchEnv(gym.Env[np.ndarray, np.int64]):
    """Dispatch ready LLM calls of multi-tenant agentic workflows to heterogeneous engines.

    Action: `Discrete(max_engines)`, the engine index. Engines beyond the episode's cluster size
    (padding) and engines that are down are invalid; so are engines whose KV cache cannot ever
    hold the call when `mask_infeasible=True` (unless none can). The valid-action mask is in
    `info["action_mask"]` and `action_masks()` (sb3-contrib MaskablePPO). **An invalid action
    raises `InvalidActionError`**: it is never remapped silently, because a silent remap would
    teach the agent that an action it did not take was its own.

    Observation: `Box(-OBS_CLIP, OBS_CLIP, (observation_size(max_engines),), float32)`; see
    `envs.observation.dispatch` for the layout and scaling (`env.unwrapped.observation_names()`).

    Reward (`envs.gym.reward`), for the simulated time between two decisions:
        completion_bonus x (workflows that finished within their SLO)
      - tardiness_weight x (increase of sum_w max(0, min(now, finish_w) - deadline_w) / slo_w)
      - rejection_penalty x (calls rejected: prompt larger than the chosen engine's KV cache)
    so the undiscounted return is the number of SLO-met workflows (the benchmark's attainment and
    goodput count) minus lateness in units of each workflow's SLO: dense, because lateness accrues
    from the moment a deadline passes, and aligned, because nothing else is rewarded.

    Episode: a workload of `scenario.queries` workflows drawn from `scenario` with an episode seed
    (`options={"episode_seed": k}` pins it; otherwise drawn from the env's RNG within the
    scenario's seed range); `options={"run_spec": spec}` runs any `RunSpec` instead (its cluster
    must fit `max_engines`). Terminates when every workflow has finished; truncates at
    `scenario.horizon_s` of simulated time. The final step's `info["metrics"]` is the dict of
    `agentsched simulate` for the episode (skip it with `episode_metrics=False`: it costs a few ms
    per episode; `metrics()` gives it on demand), `info["run_spec"]` the `RunSpec` that reproduces it.
    Every `info` carries `sim_time_s`, the simulated time of the next decision (at the episode's
    end: of its last event), so training code can align rollouts in simulated time
    (`training.input_baseline`); the observation does not change.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, scenario: Scenario | dict | str | Path | None = None, max_engines: int | None = None,
                 local_order: Any = DEFAULT_LOCAL_ORDER, local_knobs: dict[str, Any] | None = None,
                 mask_infeasible: bool = False, completion_bonus: float = COMPLETION_BONUS,
                 tardiness_weight: float = TARDINESS_WEIGHT, rejection_penalty: float = REJECTION_PENALTY,
                 episode_metrics: bool = True, render_mode: str | None = None, obs_version: int = OBS_VERSION):
        # other render modes (SB3's make_vec_env asks for "rgb_array") are accepted and render nothing
        self.render_mode = render_mode
        self.scenario = Scenario.coerce(scenario)
        needed = self.scenario.largest_cluster()
        self.max_engines = int(max_engines) if max_engines is not None else self.scenario.max_engines()
        if self.max_engines < needed:
            raise ValueError(f"max_engines={self.max_engines} is smaller than the scenario's largest cluster ({needed} engines)")
        self._queue_key, self.local_order_name = resolve_local_order(local_order, local_knobs)
        self.mask_infeasible = bool(mask_infeasible)
        self.episode_metrics = bool(episode_metrics)
        # obs_version: the observation spec (envs.observation.dispatch; older ones for policies trained on them)
        self._obs = DispatchObservation(self.max_engines, obs_version)
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (self._obs.size,), np.float32)
        self.action_space = MaskedDiscrete(self.max_engines)
        self._reward = SLOReward(completion_bonus, tardiness_weight, rejection_penalty)
        self._sim: ClusterSimulator | None = None
        self._spec: RunSpec | None = None
        self._call: LLMCall | None = None
        self._mask = np.zeros(self.max_engines, dtype=np.int8)
        self._mask_cache: dict[tuple, np.ndarray] = {}
        self._horizon_s = self.scenario.horizon_s or math.inf
        self._reset_policies: list[Any] = []  # policies already reset this episode (by identity)
        self._done = True

    # ---- Gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._spec, episode_seed = episode_for(self.scenario, self.np_random, options)
        self._sim = self._build(self._spec)
        self._obs.bind(self._sim)
        self._reward.bind(self._sim)
        self._reset_policies.clear()
        self._call = self._sim.next_decision(until_s=self._horizon_s)
        self._done = self._call is None
        self._full_mask = self._mask_for(tuple(True for _ in self._sim.engines))
        obs = self._obs.build(self._call, self._sim)
        self._update_mask()
        return obs, {"action_mask": self._mask.copy(), "episode_seed": int(episode_seed), "sim_time_s": self._sim.now_s}

    def _build(self, spec: RunSpec) -> ClusterSimulator:
        # a parsed cluster instead of its name: the YAML is read once per process, not per episode
        return build_simulator(spec.model_copy(update={"cluster": resolve_cluster(spec.cluster)}),
                               queue_key=self._queue_key)

    def _end_episode(self, info: dict[str, Any]) -> tuple[bool, bool]:
        """No decision is left: (terminated, truncated); `info` gets the episode's metrics and spec.
        Terminated when every workflow finished, truncated at the horizon."""
        self._done = True
        terminated = self._sim.done
        if self.episode_metrics:
            info["metrics"] = self.metrics()
        info["run_spec"] = self._spec
        return terminated, not terminated

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._done:
            raise RuntimeError("step() after the episode ended: call reset()")
        engine_id = self._check_action(action)
        sim = self._sim
        sim.dispatch(self._call, engine_id)
        call = self._call = sim.next_decision(until_s=self._horizon_s)
        reward = self._reward.update()
        info: dict[str, Any] = {"sim_time_s": sim.now_s}
        terminated = truncated = False
        if call is None:
            terminated, truncated = self._end_episode(info)
        obs = self._obs.build(call, sim)
        self._update_mask()
        info["action_mask"] = self._mask.copy()
        return obs, reward, terminated, truncated, info

    # ---- masks and actions ----------------------------------------------------------------------
    def _update_mask(self) -> None:
        """The valid actions for the pending call (all-zero when none is pending). Kept as shared
        read-only arrays, one per distinct mask, so steps do not allocate."""
        call = self._call
        if call is not None and self._obs.all_healthy and not self.mask_infeasible:
            self._mask = self.action_space.current_mask = self._full_mask
            return
        engines = self._sim.engines
        if call is None:
            key: tuple = ()
        else:
            key = tuple(e.healthy for e in engines)
            if self.mask_infeasible:
                tokens = call.input_tokens + call.output_tokens
                fits = tuple(h and tokens <= e.kv_capacity_tokens for h, e in zip(key, engines))
                if any(fits):
                    key = fits
        self._mask = self.action_space.current_mask = self._mask_for(key)

    def _mask_for(self, key: tuple) -> np.ndarray:
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = np.zeros(self.max_engines, dtype=np.int8)
            mask[:len(key)] = key
            mask.setflags(write=False)
            self._mask_cache[key] = mask
        return mask

    def action_masks(self) -> np.ndarray:
        """Valid actions for the pending call, as booleans (sb3-contrib MaskablePPO)."""
        return self._mask.astype(bool)

    def _check_action(self, action: Any) -> int:
        try:
            if isinstance(action, np.ndarray):
                if action.size != 1:
                    raise TypeError
                action = action.reshape(()).item()
            engine_id = operator.index(action)
        except TypeError:
            raise InvalidActionError(f"action must be one integer engine index in [0, {self.max_engines}), "
                                     f"got {action!r}") from None
        if not 0 <= engine_id < self.max_engines:
            raise InvalidActionError(f"action {engine_id} is out of range: engines are 0..{self.max_engines - 1}")
        if not self._mask[engine_id]:
            n = len(self._sim.engines)
            if engine_id >= n:
                why = f"padding (this episode's cluster has {n} engines)"
            elif not self._sim.engines[engine_id].healthy:
                why = f"engine {engine_id} ({self._sim.engines[engine_id].name}) is down"
            elif self._call is None:
                why = "no call is pending"
            else:
                why = f"engine {engine_id} cannot hold this call's {self._call.input_tokens + self._call.output_tokens} tokens"
            raise InvalidActionError(f"action {engine_id} is masked: {why}; use info['action_mask'] / action_masks()")
        return engine_id

    def render(self) -> str | None:
        """`render_mode="ansi"`: one line of the simulator's state."""
        if self.render_mode != "ansi" or self._sim is None:
            return None
        return render_text(self._sim)

    # ---- helpers ------------------------------------------------------------------------------------
    def heuristic_action(self, policy: Any) -> int:
        """The action `policy` (a `Policy`, e.g. `load_policy("hexgen")`) takes for the pending
        call, from the same state view the simulator gives it in `simulate`. The policy is reset
        on its first use in each episode, so stateful heuristics (rr's pointer) start fresh. For
        exactly the run of `simulate(spec, policy)`, make the env with the policy's local order
        too (`local_order=policy` or its name, e.g. `local_order="hexgen"`)."""
        if self._done:
            raise RuntimeError("no pending call: the episode ended, call reset()")
        if not any(p is policy for p in self._reset_policies):
            policy.reset()
            self._reset_policies.append(policy)
        return int(policy.dispatch(self._call, self._sim))

    def metrics(self) -> dict[str, Any]:
        """The `agentsched simulate` metrics dict of the episode so far."""
        return metrics_of_episode(self._sim, self._spec, {"kind": "env", "name": "agentsched/Dispatch-v0",
                                                       "local": self.local_order_name})

    def observation_names(self) -> list[str]:
        return self._obs.describe()

    @property
    def observation_layout(self) -> dict[str, slice]:
        return self._obs.layout

    @property
    def simulator(self) -> ClusterSimulator | None:
        """The episode's simulator (read-only use: it is the `ClusterView` policies see)."""
        return self._sim

    @property
    def pending_call(self) -> LLMCall | None:
        return self._call

    @property
    def run_spec(self) -> RunSpec | None:
        return self._spec
