"""Local queue orders."""

from __future__ import annotations

from envs.sim.view import CallView, EngineView
from heuristics.base import LocalOrder


class FCFS(LocalOrder):
    """First come, first served by readiness time (vLLM's default)."""

    name = "fcfs"

    def key(self, call: CallView, engine: EngineView) -> float:
        return call.ready_time_s
