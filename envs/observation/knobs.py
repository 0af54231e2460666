"""The Knobs-v0 observation and knob actions, built from the read-only view alone (no Gymnasium):
the env (`envs.gym.knobs_env`) and a trained knob policy (`policies.trained`) use the same code.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from envs.observation.dispatch import INV_RATE_SCALE, INV_TIME_SCALE, OBS_CLIP, _count
from envs.sim.catalog import load_catalog
from envs.sim.cluster import Workflow

# Simulated seconds between knob decisions: a few CHESS calls' worth, short against an SLO of a
# few minutes, long enough for a knob change to show in queues.
DEFAULT_CONTROL_INTERVAL_S = 30.0
# Burstiness (CV of inter-arrival gaps) is measured over this trailing window of arrivals.
BURSTINESS_WINDOW_S = 300.0
# Fewer gaps than this in the window: report CV 1 (what a Poisson process would give).
MIN_GAPS_FOR_CV = 3


class Knob(BaseModel):
    """One knob of the heuristic, set from one action dimension in [-1, 1] mapped linearly to
    [low, high]."""

    model_config = ConfigDict(extra="forbid")
    name: str
    layer: Literal["dispatch", "local"]
    low: float
    high: float

    @model_validator(mode="after")
    def _range(self) -> "Knob":
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"knob {self.name}: need low < high, got [{self.low}, {self.high}]")
        return self


DEFAULT_KNOBS = (Knob(name="alpha", layer="dispatch", low=0.0, high=1.0),
                 Knob(name="weight", layer="local", low=0.0, high=1.0))

# Bumped whenever features, their order, units or scaling change (trained policies record it).
OBS_VERSION = 2  # 2: slack and budget statistics asinh/log1p-scaled

GLOBAL_FEATURES: tuple[str, ...] = (
    "arrival_rate_window", "arrival_rate_interval", "burstiness_cv", "attainment_so_far", "interval_finished", "interval_attainment", "in_flight", "in_flight_late_share",
    "slack_mean", "slack_min", "budget_used_mean")
GPU_TYPE_FEATURES: tuple[str, ...] = ("engines", "healthy_share", "waiting", "running", "outstanding_work",
                                      "kv_usage_mean")


class KnobsObservation:
    """The Knobs-v0 observation, from any `ClusterView` (simulator or deploy gateway): it reads
    `workflows` (every arrived workflow, with `done`), `finished_workflows` and `met_workflows`
    besides engine state, so a trained knob policy runs through `Policy.on_interval` anywhere.
    Engines whose `gpu` label is not a catalog type (e.g. local CPU engines) have no per-type
    slot and are left out of the per-type features.

    `reset(sim)` per episode, `start_interval(sim)` when new knobs take effect, `build(sim, knob_action)`
    at the end of the interval.
    """

    def __init__(self, n_knobs: int):
        catalog = load_catalog()
        self.n_knobs = n_knobs
        self.gpu_types = list(catalog.gpus)
        self._gpu_index = {g: i for i, g in enumerate(self.gpu_types)}
        for g, spec in catalog.gpus.items():
            for alias in spec.aliases:
                self._gpu_index.setdefault(alias, self._gpu_index[g])
        self.size = len(GLOBAL_FEATURES) + n_knobs + len(self.gpu_types) * len(GPU_TYPE_FEATURES)
        self.names = ([f"global.{f}" for f in GLOBAL_FEATURES] + [f"knob[{i}]" for i in range(n_knobs)]
                      + [f"gpu[{g}].{f}" for g in self.gpu_types for f in GPU_TYPE_FEATURES])

    def reset(self, sim: Any) -> None:
        self._in_flight: list[Workflow] = []
        self._registered = 0
        self.start_interval(sim)

    def start_interval(self, sim: Any) -> None:
        self._interval_start_s = sim.now_s
        self._arrivals_at_start = len(sim.workflows)
        self._finished_at_start = sim.finished_workflows
        self._met_at_start = sim.met_workflows

    def build(self, sim: Any, knob_action: np.ndarray) -> np.ndarray:
        now = sim.now_s
        clip = OBS_CLIP
        workflows = sim.workflows
        for i in range(self._registered, len(workflows)):
            self._in_flight.append(workflows[i])
        self._registered = len(workflows)
        self._in_flight = [w for w in self._in_flight if not w.done]
        # arrivals: rate over the last interval, burstiness over a trailing window
        interval_s = max(now - self._interval_start_s, 1e-9)
        interval_rate = (len(workflows) - self._arrivals_at_start) / interval_s
        times = []
        for w in reversed(workflows):
            if w.arrival_time_s < now - BURSTINESS_WINDOW_S:
                break
            times.append(w.arrival_time_s)
        cv = 1.0
        if len(times) > MIN_GAPS_FOR_CV:
            gaps = -np.diff(np.asarray(times))
            mean = gaps.mean()
            cv = float(gaps.std() / mean) if mean > 0 else clip
        finished = sim.finished_workflows - self._finished_at_start
        met = sim.met_workflows - self._met_at_start
        in_flight = self._in_flight
        if in_flight:
            slack = np.array([(w.deadline_s - now) / w.slo_s for w in in_flight])
            used = np.array([(now - w.arrival_time_s) / w.slo_s for w in in_flight])
            late_share = float((slack < 0).mean())
            # in SLO units; asinh/log1p keep overload (workflows late by many SLOs) within a few units
            slack_mean, slack_min = math.asinh(float(slack.mean())), math.asinh(float(slack.min()))
            used_mean = math.log1p(max(0.0, float(used.mean())))
        else:
            late_share, slack_mean, slack_min, used_mean = 0.0, math.asinh(1.0), math.asinh(1.0), 0.0
        head = [sim.recent_arrival_rate_qps * INV_RATE_SCALE, interval_rate * INV_RATE_SCALE, cv,
                sim.slo_attainment_so_far, _count(finished), met / finished if finished else 1.0,
                _count(len(in_flight)), late_share, slack_mean, slack_min, used_mean]
        head.extend(float(x) for x in knob_action)
        per_type = np.zeros((len(self.gpu_types), len(GPU_TYPE_FEATURES)))
        for e in sim.engines:
            index = self._gpu_index.get(e.gpu)
            if index is None:
                continue
            row = per_type[index]
            row[0] += 1
            row[1] += e.healthy
            row[2] += e.num_waiting
            row[3] += e.num_running
            row[4] += e.outstanding_work_s
            row[5] += e.kv_usage
        count = np.maximum(per_type[:, 0], 1.0)
        per_type[:, 1] /= count
        per_type[:, 5] /= count
        per_type[:, 4] *= INV_TIME_SCALE
        per_type[:, [0, 2, 3, 4]] = np.log1p(per_type[:, [0, 2, 3, 4]])
        obs = np.concatenate([np.asarray(head, dtype=np.float64), per_type.ravel()])
        return np.clip(obs, -clip, clip).astype(np.float32)


def knob_values(knobs: Sequence[Knob], action: Any) -> dict[str, float]:
    """Knob values of an action in [-1, 1]^len(knobs): dimension i maps linearly to knobs[i]'s range."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    return {k.name: k.low + (float(x) + 1.0) * 0.5 * (k.high - k.low) for k, x in zip(knobs, a)}


def knob_action(knobs: Sequence[Knob], values: dict[str, float]) -> np.ndarray:
    """The action in [-1, 1]^len(knobs) that sets these values (all knobs must be given)."""
    return np.clip(np.array([2.0 * (values[k.name] - k.low) / (k.high - k.low) - 1.0 for k in knobs],
                            dtype=np.float32), -1.0, 1.0)


def _coerce_knobs(knobs: Sequence[Knob | dict] | None) -> list[Knob]:
    return [k if isinstance(k, Knob) else Knob.model_validate(k) for k in (knobs or DEFAULT_KNOBS)]
