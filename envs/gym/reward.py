"""The SLO reward shared by both envs.

Per step (from the previous decision at t0 to this one at t1):

    r = COMPLETION_BONUS  x  (workflows finished within their SLO during the step)
      - TARDINESS_WEIGHT  x  (increase of  sum_w max(0, min(t, finish_w) - deadline_w) / slo_w)
      - REJECTION_PENALTY x  (calls rejected during the step: prompt too long for the engine's KV)

Why this shape:
- The benchmark's objective is SLO attainment (and goodput = attainment x rate): the bonus pays
  exactly +1 per workflow that counts towards it, so the undiscounted return is the number of
  SLO-met workflows minus the penalties.
- Attainment alone is sparse (one signal per workflow, after ~20 decisions and many minutes of
  simulated time) and flat for workflows that are already late. The tardiness term is dense: as
  soon as a workflow passes its deadline it costs TARDINESS_WEIGHT per SLO-length of lateness,
  accrued continuously, so the agent is told at once that late work is piling up and still has a
  reason to finish late workflows early (lateness is measured in units of the workflow's own SLO,
  so tenants with tight and loose SLOs weigh the same).
- Rejections end the workflow early, which would stop its tardiness from accruing; the penalty
  makes that never cheaper than serving it late.

The tardiness sum is maintained incrementally (a heap of pending deadlines and the weight of
workflows currently late), so a step costs O(1) amortised plus a scan of the late set only on
steps where some workflow finished.
"""

from __future__ import annotations

import heapq

from envs.sim.cluster import ClusterSimulator, Workflow

COMPLETION_BONUS = 1.0
TARDINESS_WEIGHT = 1.0
REJECTION_PENALTY = 1.0


class SLOReward:
    """Incremental SLO reward over a simulator; `bind()` per episode, `update()` per step."""

    def __init__(self, completion_bonus: float = COMPLETION_BONUS, tardiness_weight: float = TARDINESS_WEIGHT,
                 rejection_penalty: float = REJECTION_PENALTY):
        self.completion_bonus = completion_bonus
        self.tardiness_weight = tardiness_weight
        self.rejection_penalty = rejection_penalty
        self._sim: ClusterSimulator | None = None

    def bind(self, sim: ClusterSimulator) -> None:
        self._sim = sim
        self._t = sim.now_s
        self._registered = 0
        self._pending: list[tuple[float, int]] = []  # (deadline, workflow index) not yet past
        self._late: list[Workflow] = []  # past their deadline and not finished at self._t
        self._late_weight = 0.0  # sum of 1/slo over self._late
        self._finished = sim.finished_workflows
        self._met = sim.met_workflows
        self._rejected = sim.failed_calls
        self.tardiness_total = 0.0  # sum_w max(0, min(t, f_w) - d_w) / slo_w so far

    def update(self) -> float:
        """Reward for the simulated time since the last call."""
        sim = self._sim
        t0, t1 = self._t, sim.now_s
        self._t = t1
        workflows = sim.workflows
        pending = self._pending
        for i in range(self._registered, len(workflows)):
            heapq.heappush(pending, (workflows[i].deadline_s, i))
        self._registered = len(workflows)
        tardiness = (t1 - t0) * self._late_weight
        if sim.finished_workflows != self._finished:
            self._finished = sim.finished_workflows
            if self._late:
                still = []
                for w in self._late:
                    if w.done:  # finished at f in (t0, t1]: it accrued only until f
                        tardiness -= (t1 - w.finish_time_s) / w.slo_s
                        self._late_weight -= 1.0 / w.slo_s
                    else:
                        still.append(w)
                self._late = still
                if not still:
                    self._late_weight = 0.0  # no drift from float sums
        while pending and pending[0][0] < t1:
            deadline, i = heapq.heappop(pending)
            w = workflows[i]
            if w.done:
                if w.finish_time_s > deadline:
                    tardiness += (w.finish_time_s - deadline) / w.slo_s
            else:
                tardiness += (t1 - deadline) / w.slo_s
                self._late.append(w)
                self._late_weight += 1.0 / w.slo_s
        self.tardiness_total += tardiness
        met = sim.met_workflows - self._met
        rejected = sim.failed_calls - self._rejected
        self._met = sim.met_workflows
        self._rejected = sim.failed_calls
        return self.completion_bonus * met - self.tardiness_weight * tardiness - self.rejection_penalty * rejected
