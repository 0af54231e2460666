"""A heuristic policy: a dispatcher (global) and a local order, with knob values."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from envs.sim.view import CallView, ClusterView, EngineView
from heuristics import registry
from heuristics.admission import Admission
from heuristics.base import Dispatcher, LocalOrder
from policies.base import Policy, PolicyError


def _construct(factory: Any, kind: str, name: str, knobs: Any) -> Any:
    if not isinstance(knobs, dict):
        raise PolicyError(f"policy knobs: {kind} {name!r}: knobs must be a mapping of knob: value, got {knobs!r}")
    params = inspect.signature(factory).parameters
    unknown = sorted(set(knobs) - set(params))
    if unknown:
        allowed = ", ".join(params) or "none"
        raise PolicyError(f"policy knobs: {kind} {name!r} has no knob {unknown[0]!r} (knobs: {allowed})")
    try:
        return factory(**knobs)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"policy knobs: {kind} {name!r}: {exc}") from None


class HeuristicPolicy(Policy):
    """Composes the two layers; the hot paths are bound methods, so a decision costs one call."""

    def __init__(self, dispatcher: Dispatcher, local: LocalOrder, name: str | None = None,
                 admission: Admission | None = None):
        self.dispatcher = dispatcher
        self.local = local
        self.admission = admission  # None: admit every workflow (Policy's default)
        self.name = name or f"{dispatcher.name}+{local.name}" + (f"+{admission.name}" if admission else "")
        self._key = local.key
        self._dispatch = self._bind_and_dispatch if local.needs_cluster else dispatcher.dispatch

    def _bind_and_dispatch(self, call: CallView, cluster: ClusterView) -> int:
        self.local.bind(cluster)
        return self.dispatcher.dispatch(call, cluster)

    def bind(self, cluster: ClusterView) -> None:
        """The cluster view, for a local order that reads workflow state (e.g. as a combined policy's local part)."""
        if self.local.needs_cluster:
            self.local.bind(cluster)

    @classmethod
    def build(cls, dispatch: str, local: str, dispatch_knobs: dict[str, Any] | None = None,
              local_knobs: dict[str, Any] | None = None, name: str | None = None,
              admission: dict[str, Any] | None = None) -> "HeuristicPolicy":
        """`admission`: {name: <heuristics.registry.ADMISSIONS key>, knob: value, ...} or None."""
        if dispatch not in registry.DISPATCHERS:
            raise PolicyError(f"policy dispatch: unknown dispatcher {dispatch!r} (known: {', '.join(registry.DISPATCHERS)})")
        if local not in registry.LOCAL_ORDERS:
            raise PolicyError(f"policy local: unknown local order {local!r} (known: {', '.join(registry.LOCAL_ORDERS)})")
        d = _construct(registry.DISPATCHERS[dispatch], "dispatcher", dispatch, dispatch_knobs if dispatch_knobs is not None else {})
        order = _construct(registry.LOCAL_ORDERS[local], "local order", local, local_knobs if local_knobs is not None else {})
        rule = None
        if admission is not None:
            knobs = dict(admission)
            rule_name = knobs.pop("name", None)
            if rule_name not in registry.ADMISSIONS:
                raise PolicyError(f"policy admission: unknown rule {rule_name!r} (known: {', '.join(registry.ADMISSIONS)})")
            rule = _construct(registry.ADMISSIONS[rule_name], "admission rule", rule_name, knobs)
        return cls(d, order, name=name, admission=rule)

    @classmethod
    def named(cls, name: str, dispatch_knobs: dict[str, Any] | None = None,
              local_knobs: dict[str, Any] | None = None) -> "HeuristicPolicy":
        """A named combination (`rr`, `hexgen`, ...); given knobs override its defaults."""
        if name not in registry.NAMED:
            raise PolicyError(f"policy: unknown policy name {name!r} (known: {', '.join(registry.NAMED)}; or give a policy file)")
        entry = registry.NAMED[name]
        d_knobs = {**entry.dispatch_knobs, **(dispatch_knobs or {})}
        l_knobs = {**entry.local_knobs, **(local_knobs or {})}
        return cls.build(entry.dispatch, entry.local, d_knobs, l_knobs, name=name)

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        return self._dispatch(call, cluster)

    def queue_key(self, call: CallView, engine: EngineView) -> float:
        return self._key(call, engine)

    def admit(self, call: CallView, cluster: ClusterView) -> bool:
        return True if self.admission is None else self.admission.admit(call, cluster)

    def reset(self) -> None:
        self.dispatcher.reset()
        self.local.reset()
        if self.admission is not None:
            self.admission.reset()

    def knobs(self) -> dict[str, dict[str, Any]]:
        return {"dispatch": self.dispatcher.get_knobs(), "local": self.local.get_knobs()}

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "heuristic",
            "name": self.name,
            "dispatch": {"name": self._registry_name(registry.DISPATCHERS, self.dispatcher), **self.dispatcher.get_knobs()},
            "local": {"name": self._registry_name(registry.LOCAL_ORDERS, self.local), **self.local.get_knobs()},
            **({"admission": {"name": self._registry_name(registry.ADMISSIONS, self.admission),
                              **self.admission.get_knobs()}} if self.admission is not None else {}),
        }

    @staticmethod
    def _registry_name(table: dict[str, Any], obj: Any) -> str:
        for key, factory in table.items():
            if type(obj) is factory:
                return key
        return type(obj).__name__


QueueKey = Callable[[Any, Any], float]


def resolve_local_order(local_order: Any, knobs: dict[str, Any] | None = None) -> tuple[QueueKey, str]:
    """A queue-key function and a label from: a local-order name (`urgency`, `fcfs`, `edf`), a
    named policy (`hexgen`, `rr`: its local order), a `Policy` (its `queue_key`), or a callable."""
    if isinstance(local_order, str):
        if local_order in registry.LOCAL_ORDERS:
            return _construct(registry.LOCAL_ORDERS[local_order], "local order", local_order, knobs or {}).key, local_order
        if local_order in registry.NAMED:
            named = registry.NAMED[local_order]
            policy = HeuristicPolicy.named(local_order, local_knobs={**named.local_knobs, **(knobs or {})})
            return policy.queue_key, named.local
        raise PolicyError(f"local_order: unknown {local_order!r} (local orders: {', '.join(registry.LOCAL_ORDERS)}; "
                          f"or a policy name: {', '.join(registry.NAMED)})")
    if hasattr(local_order, "queue_key"):
        return local_order.queue_key, getattr(local_order, "name", "policy")
    if callable(local_order):
        return local_order, getattr(local_order, "__name__", "custom")
    raise TypeError(f"local_order must be a name, a Policy or a callable, got {type(local_order).__name__}")
