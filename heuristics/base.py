"""The two halves of a hierarchical scheduler, each a small class over the read-only view."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from envs.sim.view import CallView, ClusterView, EngineView


class Dispatcher(ABC):
    """Global layer: which engine gets a call that just became ready."""

    name: ClassVar[str]
    knobs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def dispatch(self, call: CallView, cluster: ClusterView) -> int: ...

    def reset(self) -> None:
        """Forget per-run state."""

    def get_knobs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.knobs}


class LocalOrder(ABC):
    """Local layer: the admission order of an engine's waiting calls (smaller key first)."""

    name: ClassVar[str]
    knobs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def key(self, call: CallView, engine: EngineView) -> float: ...

    def get_knobs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.knobs}


def healthy(cluster: ClusterView) -> list[int]:
    return [i for i, e in enumerate(cluster.engines) if e.healthy]
