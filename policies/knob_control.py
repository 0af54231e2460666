"""A knob policy's side of Knobs-v0 outside the env: carry the observation between control
intervals and set a heuristic's knobs from an action (trained knob policies, `policies.trained`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from envs.observation import InvalidActionError
from envs.observation.knobs import Knob, KnobsObservation, _coerce_knobs, knob_action, knob_values
from policies.base import PolicyError
from policies.heuristic import HeuristicPolicy


@dataclass
class KnobsState:
    """What a knob policy outside the env carries between intervals (see `knobs_observation`)."""

    observer: KnobsObservation
    knobs: list[Knob]
    action: np.ndarray  # the knobs in force, as an action in [-1, 1]


def knobs_observation(cluster: Any, state: KnobsState | None = None, *, knobs: Sequence[Knob | dict] | None = None,
                      policy: str = "hexgen", **_env_kwargs: Any) -> tuple[np.ndarray, KnobsState]:
    """Knobs-v0's observation from a simulator-like cluster, for a trained knob policy's
    `on_interval(cluster)` inside `simulate`: `obs, state = knobs_observation(cluster, state, **env_kwargs)`
    then `apply_knobs(heuristic, action, state=state)`. The first call (state None) starts the
    first interval now, with `policy`'s default knobs in force. Other env keyword arguments
    (scenario, control_interval_s, ...) are accepted and ignored."""
    if state is None:
        ks = _coerce_knobs(knobs)
        base = HeuristicPolicy.named(policy)
        defaults = {**base.dispatcher.get_knobs(), **base.local.get_knobs()}
        state = KnobsState(KnobsObservation(len(ks)), ks, knob_action(ks, {k.name: float(defaults[k.name]) for k in ks}))
        state.observer.reset(cluster)
    obs = state.observer.build(cluster, state.action)
    state.observer.start_interval(cluster)
    return obs, state


def apply_knobs(heuristic: Any, action: Any, knobs: Sequence[Knob | dict] | None = None,
                state: KnobsState | None = None) -> dict[str, float]:
    """Set a `HeuristicPolicy`'s knobs from an action (clipped to [-1, 1]: outside the env a policy
    should degrade, not fail); returns the values set. With `state`, its knobs are used and the
    action is remembered for the next observation."""
    ks = state.knobs if state is not None else _coerce_knobs(knobs)
    a = np.clip(np.nan_to_num(np.asarray(action, dtype=np.float64).reshape(-1), nan=0.0), -1.0, 1.0)
    if a.shape != (len(ks),):
        raise InvalidActionError(f"action must have {len(ks)} values (one per knob), got shape {np.shape(action)}")
    values = knob_values(ks, a)
    for k in ks:
        target = heuristic.dispatcher if k.layer == "dispatch" else heuristic.local
        if k.name not in target.get_knobs():
            raise PolicyError(f"knobs: {type(target).__name__} has no knob {k.name!r}")
        setattr(target, k.name, values[k.name])
    if state is not None:
        state.action = a.astype(np.float32)
    return values
