"""Global dispatchers."""

from __future__ import annotations

from envs.sim.view import CallView, ClusterView
from heuristics.base import Dispatcher


class RoundRobin(Dispatcher):
    """What vLLM users do with several instances behind a plain load balancer."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def reset(self) -> None:
        self._next = 0

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        engines = cluster.engines
        n = len(engines)
        for _ in range(n):
            i = self._next % n
            self._next = i + 1
            if engines[i].healthy:
                return i
        raise RuntimeError("no healthy engine")
