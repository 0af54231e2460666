"""Local queue orders: the key by which an engine admits its waiting calls (smaller first).

Keys must not depend on the current time (engine queues are heaps). Every rule of the form
"most urgent = largest now + x - deadline" orders like the key deadline - x, because `now` is the
same for all waiting calls at any instant, so that is what the keys below use.
"""

from __future__ import annotations

from typing import ClassVar

from envs.sim.view import CallView, EngineView
from heuristics.base import LocalOrder, check_non_negative, check_unit_interval


class FCFS(LocalOrder):
    """First come, first served by readiness time (vLLM's default)."""

    name = "fcfs"

    def key(self, call: CallView, engine: EngineView) -> float:
        return call.ready_time_s


class EarliestDeadlineFirst(LocalOrder):
    """Earliest call deadline first (the call's proportional slice of its query's SLO budget).
    Ignores how long the call will take here, unlike the urgency order."""

    name = "edf"

    def key(self, call: CallView, engine: EngineView) -> float:
        return call.deadline_s


class Urgency(LocalOrder):
    """HexGen-Text2SQL's urgency order: admit the call with the largest
        urgency = elapsed + T_e(s) - deadline_budget = now + T_e(s) - deadline
    (least slack first), where T_e(s) is the call's expected latency on this engine. As `now` is
    common to all waiting calls, that is the key deadline - T_e(s). The `weight` knob blends it
    with FCFS: key = weight * (deadline - T_e(s)) + (1 - weight) * ready_time; weight=1 is the
    paper's pure urgency, weight=0 is FCFS. Both terms are absolute times in seconds, so the blend
    is a weighted priority time and stays time-invariant.
    """

    name = "urgency"
    knobs: ClassVar[tuple[str, ...]] = ("weight",)
    search_space = {"weight": ("float", 0.0, 1.0)}

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = check_unit_interval("weight", weight)

    def key(self, call: CallView, engine: EngineView) -> float:
        return self._blend(call, engine.expected_latency_s(call.step))

    def _blend(self, call: CallView, t_e: float) -> float:
        slack_key = call.deadline_s - t_e
        w = self.weight
        if w == 1.0:
            return slack_key
        return w * slack_key + (1.0 - w) * call.ready_time_s


# Calls already past saving wait behind every call that can still make it (about 3 years of
# simulated time would have to pass for a readiness-time gap to outweigh this).
HOPELESS_OFFSET_S = 1e8


def check_margin(margin: float) -> float:
    return check_non_negative("margin", margin, "1 = give up only on calls that cannot make it alone")


def past_saving(call: CallView, t_e: float, margin: float) -> bool:
    """The call's slice of its budget is under `margin` solo latencies: even admitted the moment it
    became ready (margin 1), or through a loaded engine's queue and batch (margin > 1), it is
    unlikely to meet its deadline."""
    return call.deadline_s - margin * t_e < call.ready_time_s


class UrgencyTriage(Urgency):
    """Urgency with triage: a call that would miss its deadline even if admitted the moment it
    became ready (deadline - margin * T_e(s) < ready time) is queued behind every call that can
    still make it. Under overload, pure urgency serves the most hopeless calls first and drags
    savable workflows down with them; triage lets those workflows meet their SLO instead. On the
    paper cluster at 0.12 q/s it raises tuned HexGen's SLO-goodput by 11-14% (heuristics/README.md).
    `margin` > 1 gives up earlier: a call whose slice of the budget is less than `margin` solo
    latencies is unlikely to make it through a loaded engine's queue and batch either."""

    name = "urgency-triage"
    knobs = ("weight", "margin")
    search_space = {"weight": ("float", 0.0, 1.0), "margin": ("float", 1.0, 3.0)}

    def __init__(self, weight: float = 1.0, margin: float = 1.0) -> None:
        super().__init__(weight)
        self.margin = check_margin(margin)

    def key(self, call: CallView, engine: EngineView) -> float:
        t_e = engine.expected_latency_s(call.step)
        key = self._blend(call, t_e)
        return key + HOPELESS_OFFSET_S if past_saving(call, t_e, self.margin) else key


class WorkflowFirst(LocalOrder):
    """Whole workflows first: an engine admits the calls of the workflow with the earliest
    end-to-end deadline first (arrival order within one tenant), and a call past saving (its slice
    of the budget is under `margin` x T_e(s), as in urgency-triage) waits behind every call that
    can still make it.

    Per-call orders (urgency, FCFS by readiness) interleave workflows: under overload each step
    of every workflow waits behind the steps of all the others, so all of them advance and many
    finish late. Ordering by the workflow lets the earliest workflows run their 15-30 dependent
    calls back to back and meet their SLO; the rest wait, and are given up on once hopeless. Most
    of its gain over urgency is the giving up: urgency-triage at the same margin comes within
    0-3% of it (heuristics/README.md, "Overload")."""

    name = "workflow-first"
    knobs = ("margin",)
    search_space = {"margin": ("float", 1.0, 3.0)}

    def __init__(self, margin: float = 2.0) -> None:
        self.margin = check_margin(margin)

    def key(self, call: CallView, engine: EngineView) -> float:
        key = call.workflow_deadline_s
        return key + HOPELESS_OFFSET_S if past_saving(call, engine.expected_latency_s(call.step), self.margin) else key


# Tenant priorities are small integers; one priority level outweighs any readiness-time gap
# (a run would need to last about 30 years of simulated time to break this).
PRIORITY_LEVEL_S = 1e9


class TenantPriority(LocalOrder):
    """vLLM's `--scheduling-policy priority`: the tenant's priority first (lower is more
    important), then first come, first served."""

    name = "priority"

    def key(self, call: CallView, engine: EngineView) -> float:
        return call.priority * PRIORITY_LEVEL_S + call.ready_time_s
