"""Workflow-level admission: whether a workflow whose call just became ready stays admitted.

A deferred workflow is not dropped: the simulator queues its calls behind every call of a workflow
that is not deferred, on every engine, from then on (`ClusterSimulator.defer_workflow`), so it only
takes engine time nobody else wants, and it still counts as missed if it ends late. Under sustained
overload a work-conserving scheduler that keeps serving workflows which will miss their SLO anyway
spends the cluster on them and drags savable ones down too: SLO-goodput falls as the load rises
past capacity instead of levelling off. Admission control (give up early on the hopeless) is the
classic cure; the per-call triage of the local orders (`heuristics.local.past_saving`) is its
call-level, non-sticky cousin.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from envs.sim.view import CallView, ClusterView
from heuristics.base import SearchSpace, check_non_negative


class Admission(ABC):
    """Admission layer: keep the call's workflow admitted (True) or defer it for good (False)."""

    name: ClassVar[str]
    knobs: ClassVar[tuple[str, ...]] = ()
    search_space: ClassVar[SearchSpace] = {}

    @abstractmethod
    def admit(self, call: CallView, cluster: ClusterView) -> bool: ...

    def reset(self) -> None:
        """Forget per-run state."""

    def get_knobs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.knobs}


class DeferLate(Admission):
    """Defer a workflow once even `margin` times its remaining solo work no longer fits before its
    deadline:

        defer  if  now + margin x (T_best(call) + R_w) + queue_weight x T_best(call) x waiting_best > deadline_w

    and, with `active_per_engine` > 0, defer a new workflow (at its first call) while that many
    admitted workflows per healthy engine are still unfinished: a cap on the workflows in flight,
    so that under overload the admitted ones run at the speed their SLO needs instead of every
    workflow advancing slowly and most of them missing.

    T_best(call) is the call's expected latency on its fastest healthy engine (prefix-cache hits
    included), R_w the workflow's expected remaining solo seconds after this call (the SLO rule's
    standard workflow, `WorkflowView.expected_remaining_s`) and waiting_best the fewest calls waiting
    at any healthy engine: the queue the workflow would join at best. margin 1 gives up only on
    workflows that cannot finish even alone on the fastest engines; margin > 1 gives up earlier,
    as a loaded engine's batch stretches every call. `queue_weight` 0 ignores the queues.
    """

    name = "defer-late"
    knobs = ("margin", "queue_weight", "active_per_engine")
    search_space = {"margin": ("float", 0.0, 3.0), "queue_weight": ("float", 0.0, 1.0),
                    "active_per_engine": ("float", 0.0, 16.0)}

    def __init__(self, margin: float = 1.5, queue_weight: float = 0.0, active_per_engine: float = 0.0) -> None:
        self.margin = check_non_negative("margin", margin, "1 = defer only workflows that cannot finish alone; 0 = never")
        self.queue_weight = check_non_negative("queue_weight", queue_weight)
        self.active_per_engine = check_non_negative("active_per_engine", active_per_engine, "0 = no cap")
        self._active: list[int] = []  # admitted workflows, unfinished when last looked at
        self._seen: set[int] = set()  # workflows whose first call was decided on

    def reset(self) -> None:
        self._active = []
        self._seen = set()

    def admit(self, call: CallView, cluster: ClusterView) -> bool:
        best_s, waiting, healthy = math.inf, 1 << 62, 0
        for e in cluster.engines:
            if e.healthy:
                healthy += 1
                best_s = min(best_s, e.expected_call_latency_s(call))
                waiting = min(waiting, e.num_waiting)
        if best_s == math.inf:
            return True  # nothing to compare with (the simulator never asks then)
        wid = call.workflow_id
        workflow = cluster.workflow(wid)
        need_s = self.margin * (best_s + workflow.expected_remaining_s) + self.queue_weight * best_s * waiting
        admitted = cluster.now_s + need_s <= workflow.deadline_s
        if self.active_per_engine > 0.0 and wid not in self._seen:
            self._seen.add(wid)
            self._active = [w for w in self._active if not cluster.workflow(w).done]
            admitted = admitted and len(self._active) < self.active_per_engine * healthy
            if admitted:
                self._active.append(wid)
        elif not admitted and self.active_per_engine > 0.0:
            self._active = [w for w in self._active if w != wid]
        return admitted
