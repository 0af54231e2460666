"""`agentsched/Dispatch-v1`: Dispatch-v0 plus a workflow-level admission action.

At each dispatch decision for a call of a workflow that is still admitted, the agent either picks
the engine (actions `0 .. max_engines-1`, as in Dispatch-v0: the workflow stays admitted) or
defers the call's workflow (action `max_engines`): the simulator then queues the workflow's calls
behind every call of an admitted workflow, on every engine, from then on, and treats them as
background work that joins only a batch running nothing else (`ClusterSimulator.defer_workflow`);
the call itself goes to the base policy's engine. Calls of workflows already deferred are not
asked about: the base policy places them inside `step`. A deferred workflow still counts as
missed if it ends late; deferral is for good.

Why a new env version: under sustained overload SLO-goodput collapses as the load rises, because
a work-conserving scheduler keeps spending engine time on workflows that will miss anyway (see
heuristics/admission.py); giving up on them is a decision Dispatch-v0 cannot express.

Reward: `envs.gym.reward.SLOReward` with, by default, no tardiness term (`tardiness_weight=0`):
lateness of a workflow that was given up on is not worth engine time, so penalising it would pay
the agent to keep serving hopeless workflows, the very behaviour the admission action is for.
The undiscounted return is the number of SLO-met workflows. `differential=True` subtracts
rho x (simulated seconds of the step), with rho the running average reward per simulated second
over this env's past episodes (the average-reward form Decima uses on job streams: returns of long
episodes are then about doing better than average, not about episode length).

The observation is Dispatch-v0's (same layout and version) followed by three admission features
(`envs.observation.admission`: admitted and deferred workflows in flight per engine, first call);
the network needs one more output (`training.networks`, `scorer_admission=True`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from envs.gym.dispatch_env import DEFAULT_LOCAL_ORDER, DispatchEnv, MaskedDiscrete
from envs.gym.reward import COMPLETION_BONUS, REJECTION_PENALTY
from envs.observation import InvalidActionError
from envs.observation.admission import AdmissionObservation
from envs.observation.dispatch import OBS_CLIP, OBS_VERSION
from policies.loader import load_policy

DEFAULT_BASE_POLICY = "least-work+workflow"
# running average of the reward rate: weight of the newest episode
REWARD_RATE_EMA = 0.1


class AdmissionDispatchEnv(DispatchEnv):
    """Dispatch-v0 with one more action, `defer` (index `max_engines`, always valid while a call is
    pending). `base_policy` (a policy name or `Policy`) places the calls the agent does not: the
    call of a workflow it defers and every later call of deferred workflows. `info["action_mask"]`
    and `action_masks()` have `max_engines + 1` entries."""

    def __init__(self, scenario: Any = None, max_engines: int | None = None, local_order: Any = DEFAULT_LOCAL_ORDER,
                 local_knobs: dict[str, Any] | None = None, mask_infeasible: bool = False,
                 completion_bonus: float = COMPLETION_BONUS, tardiness_weight: float = 0.0,
                 rejection_penalty: float = REJECTION_PENALTY, episode_metrics: bool = True,
                 render_mode: str | None = None, obs_version: int = OBS_VERSION,
                 base_policy: Any = DEFAULT_BASE_POLICY, differential: bool = False):
        super().__init__(scenario, max_engines, local_order, local_knobs, mask_infeasible, completion_bonus,
                         tardiness_weight, rejection_penalty, episode_metrics, render_mode, obs_version)
        self.defer_action = self.max_engines
        self.action_space = MaskedDiscrete(self.max_engines + 1)
        self._admission_obs = AdmissionObservation(self.max_engines, obs_version, dispatch=self._obs)
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (self._admission_obs.size,), np.float32)
        self._deferred: set[int] = set()
        self.base_policy = load_policy(base_policy) if isinstance(base_policy, str) else base_policy
        self.base_policy_name = base_policy if isinstance(base_policy, str) else getattr(base_policy, "name", "policy")
        self.differential = bool(differential)
        self.reward_rate = 0.0  # rho: reward per simulated second, averaged over past episodes
        self._episode_return = 0.0
        self._masks_v1: dict[int, np.ndarray] = {}

    # ---- Gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        obs, info = super().reset(seed=seed, options=options)
        self.base_policy.reset()
        self._deferred = set()
        self._episode_return = 0.0
        self._t_s = self._sim.now_s
        obs = self._admission_obs.build(self._call, self._sim, self._deferred)
        self._update_mask()
        info["action_mask"] = self._mask.copy()
        return obs, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._done:
            raise RuntimeError("step() after the episode ended: call reset()")
        a = self._check_action(action)
        sim = self._sim
        call = self._call
        if a == self.defer_action:
            sim.defer_workflow(call.workflow_id)
            self._deferred.add(call.workflow_id)
            engine_id = self.base_policy.dispatch(call, sim)
        else:
            engine_id = a
        sim.dispatch(call, engine_id)
        self._call = sim.next_decision(until_s=self._horizon_s)
        reward = self._reward.update() + self._place_deferred()
        if self.differential:
            reward -= self.reward_rate * (sim.now_s - self._t_s)
        self._t_s = sim.now_s
        self._episode_return += reward
        info: dict[str, Any] = {"sim_time_s": sim.now_s}
        terminated = truncated = False
        if self._call is None:
            terminated, truncated = self._end_episode(info)
            span = sim.now_s
            if span > 0:
                met_rate = sim.met_workflows * self._reward.completion_bonus / span  # rho of the plain reward
                self.reward_rate += REWARD_RATE_EMA * (met_rate - self.reward_rate)
        obs = self._admission_obs.build(self._call, sim, self._deferred)
        self._update_mask()
        info["action_mask"] = self._mask.copy()
        return obs, reward, terminated, truncated, info

    def _place_deferred(self) -> float:
        """Place calls of deferred workflows with the base policy until a call of an admitted
        workflow is pending (or the episode ends); the reward accrued meanwhile."""
        sim = self._sim
        reward = 0.0
        while self._call is not None and sim.workflows[self._call.workflow_id].deferred:
            sim.dispatch(self._call, self.base_policy.dispatch(self._call, sim))
            self._call = sim.next_decision(until_s=self._horizon_s)
            reward += self._reward.update()
        return reward

    # ---- masks and actions ----------------------------------------------------------------------
    def _update_mask(self) -> None:
        super()._update_mask()
        engines = self._mask
        mask = self._masks_v1.get(id(engines))
        if mask is None or mask[0] is not engines:
            full = np.zeros(self.max_engines + 1, dtype=np.int8)
            full[:self.max_engines] = engines
            full[self.defer_action] = 1 if engines.any() else 0  # defer: whenever a call is pending
            full.setflags(write=False)
            mask = self._masks_v1[id(engines)] = (engines, full)
        self._mask = self.action_space.current_mask = mask[1]

    def _check_action(self, action: Any) -> int:
        if self._call is not None:
            try:
                value = int(np.asarray(action).reshape(()))
            except (TypeError, ValueError):
                value = -1
            if value == self.defer_action:
                return value
        engine_mask, self._mask = self._mask, self._mask[:self.max_engines]
        try:
            return super()._check_action(action)
        except InvalidActionError as exc:
            raise InvalidActionError(f"{exc} (or {self.defer_action} = defer the workflow)") from None
        finally:
            self._mask = engine_mask

    def heuristic_action(self, policy: Any) -> int:
        """`policy`'s admission decision and engine for the pending call, as this env's action:
        defer when `policy.admit` says no (the env's base policy then places the call; give the
        env the same base dispatcher for exactly the run of `simulate(spec, policy)`), else its engine."""
        if self._done:
            raise RuntimeError("no pending call: the episode ended, call reset()")
        if not any(p is policy for p in self._reset_policies):
            policy.reset()
            self._reset_policies.append(policy)
        if not policy.admit(self._call, self._sim):
            return self.defer_action
        return int(policy.dispatch(self._call, self._sim))

    def observation_names(self) -> list[str]:
        return self._admission_obs.describe()

    def metrics(self) -> dict[str, Any]:
        out = super().metrics()
        out["policy"] = {"kind": "env", "name": "agentsched/Dispatch-v1", "local": self.local_order_name,
                         "base": self.base_policy_name}
        out["deferred_workflows"] = sum(1 for w in self._sim.workflows if w.deferred)
        return out

    def set_queries(self, queries: int) -> None:
        """Episode length (workflows per episode) from the next reset on: the curriculum's knob."""
        self.scenario = self.scenario.model_copy(update={"queries": int(queries)})
