"""One policy's global dispatch with another policy's local order and control-interval knobs.

This is how a learned dispatch network and a learned knob controller run together ("both"): the
engine of every call comes from `dispatch_policy`; the admission order inside engines and the
periodic knob updates come from `local_policy`. Written as a policy file:

    kind: combined
    name: dispatch-heavy+knobs
    dispatch: dispatch-heavy          # a heuristic name, policy file or trained policy path
    local: ../knobs-ppo               # paths are relative to this file
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from envs.sim.view import CallView, ClusterView, EngineView
from policies.base import Policy, PolicyError

FIELDS = ("kind", "name", "dispatch", "local")


class CombinedPolicy(Policy):
    def __init__(self, dispatch_policy: Policy, local_policy: Policy, name: str | None = None,
                 sources: tuple[str, str] | None = None):
        self.dispatch_policy = dispatch_policy
        self.local_policy = local_policy
        self.name = name or f"{dispatch_policy.name}+{local_policy.name}"
        self._sources = sources or (dispatch_policy.name, local_policy.name)
        self.interval_s = self._part_interval_s(local_policy, dispatch_policy)

    @staticmethod
    def _part_interval_s(*parts: Policy) -> float | None:
        """Control interval of whichever part has one (the local part's first), so the simulator
        and the gateway tick `on_interval` as they would for that part alone. A part's interval is
        fixed when it is built, so it is read once here."""
        for part in parts:
            if part.interval_s:
                return float(part.interval_s)
        return None

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        # a knob controller takes its first decision when it first sees the cluster
        self.local_policy.bind(cluster)
        return self.dispatch_policy.dispatch(call, cluster)

    def bind(self, cluster: ClusterView) -> None:
        self.dispatch_policy.bind(cluster)
        self.local_policy.bind(cluster)

    def queue_key(self, call: CallView, engine: EngineView) -> float:
        return self.local_policy.queue_key(call, engine)

    def on_interval(self, cluster: ClusterView) -> None:
        self.dispatch_policy.on_interval(cluster)
        self.local_policy.on_interval(cluster)

    def reset(self) -> None:
        self.dispatch_policy.reset()
        self.local_policy.reset()

    def spec(self) -> dict[str, Any]:
        return {"kind": "combined", "name": self.name, "dispatch": self._sources[0], "local": self._sources[1]}


def combined_from_spec(spec: dict[str, Any], base_dir: Path, source: str,
                       load_policy: Callable[[str], Policy]) -> CombinedPolicy:
    """The combined policy of a `kind: combined` file; `load_policy` loads each part (the loader's)."""
    unknown = sorted(set(spec) - set(FIELDS))
    if unknown:
        raise PolicyError(f"{source}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    parts = []
    for field in ("dispatch", "local"):
        value = spec.get(field)
        if not isinstance(value, str) or not value:
            raise PolicyError(f"{source}: {field}: must name a policy (heuristic name, policy file or trained "
                              f"policy path), got {value!r}")
        relative = base_dir / value
        parts.append(str(relative) if relative.exists() else value)
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise PolicyError(f"{source}: name: must be a string, got {name!r}")
    return CombinedPolicy(load_policy(parts[0]), load_policy(parts[1]), name=name,
                          sources=(spec["dispatch"], spec["local"]))
