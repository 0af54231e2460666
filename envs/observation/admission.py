"""The Dispatch-v1 observation: Dispatch-v0's vector plus what an admission decision needs.

Appended after the v0 layout (so its indices stay), `ADMISSION_FEATURES`:
- admitted_in_flight: log1p(unfinished workflows not deferred / healthy engines), the load the
  admitted set puts on the cluster (the defer-late heuristic caps it with `active_per_engine`);
- deferred_in_flight: the same for deferred workflows;
- first_call: 1 if the call is in its workflow's first stage (admission at arrival).

Which workflows are deferred is passed in by the caller (the env knows its own deferrals, a
trained policy the ones it made), so only the read-only view protocols are read, as in v0.
"""

from __future__ import annotations

from typing import Collection

import numpy as np

from envs.observation.dispatch import OBS_VERSION, DispatchObservation, _log1p_clip
from envs.sim.view import CallView, ClusterView

ADMISSION_FEATURES: tuple[str, ...] = ("admitted_in_flight", "deferred_in_flight", "first_call")


class AdmissionObservation:
    """`build(call, cluster, deferred)`: the v0 vector of `dispatch` (a `DispatchObservation`) and the
    admission features. Keeps a pointer to the oldest unfinished workflow, so a step scans only the
    workflows in flight."""

    def __init__(self, max_engines: int, version: int = OBS_VERSION, dispatch: DispatchObservation | None = None):
        self.dispatch = dispatch if dispatch is not None else DispatchObservation(max_engines, version)
        self.size = self.dispatch.size + len(ADMISSION_FEATURES)
        self._cluster: ClusterView | None = None
        self._first_open = 0

    def describe(self) -> list[str]:
        return [*self.dispatch.describe(), *ADMISSION_FEATURES]

    def build(self, call: CallView | None, cluster: ClusterView | None, deferred: Collection[int]) -> np.ndarray:
        base = self.dispatch.build(call, cluster)
        if call is None or cluster is None:
            return np.concatenate([base, np.zeros(len(ADMISSION_FEATURES), np.float32)])
        workflows = cluster.workflows
        if cluster is not self._cluster or self._first_open > len(workflows):
            self._cluster, self._first_open = cluster, 0
        i = self._first_open
        while i < len(workflows) and workflows[i].done:
            i += 1
        self._first_open = i
        admitted = held = 0
        for w in workflows[i:]:
            if not w.done:
                if w.workflow_id in deferred:
                    held += 1
                else:
                    admitted += 1
        healthy = max(1, sum(1 for e in cluster.engines if e.healthy))
        extra = np.array([_log1p_clip(admitted / healthy), _log1p_clip(held / healthy),
                          1.0 if call.stage_index == 0 else 0.0], np.float32)
        return np.concatenate([base, extra])
