"""The `Policy` interface: what the simulator, the envs and the gateway call.

A policy makes the two decisions of the paper's hierarchy, after an optional admission decision:
- `admit`: whether the workflow of a call that just became ready stays admitted; `False` defers
  it (`ClusterSimulator.defer_workflow`): from then on its calls wait behind every call of a
  workflow that is not deferred, on every engine. The default admits everything, which is every
  policy's behaviour before this hook existed. The simulator asks once per ready call of a workflow
  not yet deferred, just before `dispatch`; the deploy gateway does not ask yet (it admits all);
- `dispatch`: which engine gets a call that just became ready (global);
- `queue_key`: the order in which an engine admits its waiting calls (local). Smaller keys are
  admitted first. Keys must not depend on the current time, so queues can be heaps: every
  urgency rule of the form "now + something - deadline" orders the same way at every instant.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from envs.sim.cluster import ClusterSimulator
from envs.sim.view import CallView, ClusterView, EngineView


class PolicyError(ValueError):
    """A policy name, file or knob value that cannot be used; the message says which and how to fix it."""


@dataclass(frozen=True)
class IntervalDecision:
    """One control-interval decision of a planner (`Policy.plan_interval`): the knob setting to
    adopt and what the rollouts predicted for it and for the setting in force."""

    time_s: float  # on the planning simulator's clock (simulated time, or the gateway's uptime)
    knobs: dict[str, float]  # the setting to adopt (equal to the current one when kept)
    current_knobs: dict[str, float]
    changed: bool
    # mean rollout objective: SLO-met workflows (in flight or arriving within the horizon, on-track
    # ones counted), lateness as tie-breaker; and the same as SLO-goodput over the horizon
    predicted_objective: float
    current_objective: float
    horizon_s: float
    decision_s: float  # wall time of the planning

    @property
    def predicted_gain(self) -> float:
        return self.predicted_objective - self.current_objective

    @property
    def predicted_goodput_qps(self) -> float:
        return self.predicted_objective / self.horizon_s

    @property
    def current_goodput_qps(self) -> float:
        return self.current_objective / self.horizon_s


class Policy(ABC):
    """Everything the simulator, the envs and the gateway ask of a policy; nothing else is looked up."""

    name: str = "policy"
    # period of `on_interval` in seconds (simulated or wall-clock); None: the policy needs no ticks
    # (the gateway then ticks at its cluster file's control_interval_s)
    interval_s: float | None = None
    # True for planners that decide each interval by rolling candidates out on a simulator of the
    # current state (`plan_interval`, seconds of CPU). In `simulate` the simulator is its own such
    # simulator (`on_interval` plans on it). The gateway never calls their `on_interval`: every
    # interval it builds its digital twin from a snapshot of the live state
    # (`envs.sim.fork.simulator_from_view`), runs `plan_interval(twin)` in a worker thread, and
    # `adopt_plan` on its event loop, so the search never holds up a dispatch.
    plans_on_twin: bool = False

    def admit(self, call: CallView, cluster: ClusterView) -> bool:
        """Keep `call`'s workflow admitted (True, the default) or defer it (False) for good."""
        return True

    @abstractmethod
    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        """Index into `cluster.engines` of the (healthy) engine that gets `call`."""

    def queue_key(self, call: CallView, engine: EngineView) -> float:
        """Admission order at an engine; default FCFS by readiness time."""
        return call.ready_time_s

    def bind(self, cluster: ClusterView) -> None:
        """Called with the cluster before a decision (a knob controller takes its first decision
        when it first sees the cluster); default does nothing."""

    def on_interval(self, cluster: ClusterView) -> None:
        """Periodic hook (control interval) for policies that adapt knobs; default does nothing."""

    def plan_interval(self, twin: ClusterSimulator) -> IntervalDecision | None:
        """The decision of one control interval, planned on `twin` (a simulator in the current
        state: forked, never advanced) and on nothing else that the gateway mutates, so it may run
        in a worker thread. Changes nothing (`adopt_plan` does). Default: no decision."""
        return None

    def adopt_plan(self, decision: IntervalDecision | None) -> None:
        """Apply a decision of `plan_interval` (where dispatch runs: the event loop); default: nothing."""

    def reset(self) -> None:
        """Forget per-episode state (round-robin pointers, cumulative work)."""

    def spec(self) -> dict[str, Any]:
        """A JSON/YAML-serialisable description that `policies.load_policy` turns back into this policy."""
        return {"name": self.name}
