"""The two halves of a hierarchical scheduler, each a small class over the read-only view.

A `Dispatcher` (global) picks the engine for a ready call; a `LocalOrder` (local) gives the
time-invariant key by which an engine admits its waiting calls (smaller first). Knobs are plain
constructor arguments, validated there (a bad value raises ValueError, which the policy layer
turns into one `PolicyError` line); `search_space` tells `agentsched tune` what to search.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

from envs.sim.view import CallView, ClusterView, EngineView

# knob name -> ("float", low, high) | ("categorical", choices)
SearchSpace = dict[str, tuple[Any, ...]]


class NoHealthyEngine(RuntimeError):
    """Raised by a dispatcher asked to place a call when every engine is down (the simulator and
    the gateway hold calls instead of asking, so this signals a caller bug)."""


class Dispatcher(ABC):
    """Global layer: which engine gets a call that just became ready."""

    name: ClassVar[str]
    knobs: ClassVar[tuple[str, ...]] = ()
    search_space: ClassVar[SearchSpace] = {}

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
    search_space: ClassVar[SearchSpace] = {}

    # orders whose key reads workflow state (attained service, remaining work) set this: the policy
    # then hands them the cluster view before every dispatch (`bind`), and keys read it on enqueue
    needs_cluster: ClassVar[bool] = False

    @abstractmethod
    def key(self, call: CallView, engine: EngineView) -> float: ...

    def bind(self, cluster: ClusterView) -> None:
        """The live cluster view (only called when `needs_cluster`)."""

    def reset(self) -> None:
        """Forget per-run state."""

    def get_knobs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.knobs}


def healthy(cluster: ClusterView) -> list[int]:
    return [i for i, e in enumerate(cluster.engines) if e.healthy]


# ---- knob validation: ValueError with a message that names the knob and the allowed values ----

def check_unit_interval(knob: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{knob} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_non_negative(knob: str, value: Any, meaning: str = "") -> float:
    """A finite number >= 0; `meaning` (e.g. "1 = ...") is added to the message to say what values do."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
        raise ValueError(f"{knob} must be a number >= 0{f' ({meaning})' if meaning else ''}, got {value!r}")
    return float(value)


def check_int(knob: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{knob} must be an integer, got {value!r}")
    return value


def check_choice(knob: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{knob} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)
