"""Simulator-in-the-loop planning: `lookahead` (per dispatch) and `lookahead-knobs` (per interval).

`lookahead` answers a dispatch decision by trying it: for the candidate engines (the base policy's
own choice first, then the best others by the base's earliest-finish score, `top_k` in all) it forks
the simulator `samples` times (`envs.sim.fork.fork`: unknown output lengths and future arrivals
redrawn, the same seeds for every candidate: common random numbers; future arrivals from the
run's arrival process with `arrivals=model`, the default, or at the recent rate with
`arrivals=recent`; the unknown output lengths of arrived workflows at their conditional median
with `lengths=median`, the default, or drawn with `lengths=sample`), places the call on the
candidate, rolls the fork forward `horizon_s` simulated seconds with the base policy, and scores
the objective: SLO-met workflows among those in flight or arriving within the horizon (unfinished
ones count if still on track), with their lateness as tie-breaker. The best mean wins if it beats
the base policy's choice by more than `margin` workflows (noise of a few samples should not move
a decision); otherwise the base's choice stays, so `horizon_s=0` (or one candidate) is the base.
With `clairvoyant=True` nothing is redrawn: the planner knows true lengths and arrivals (not
deployable; the empirical upper reference of benchmarks/headroom.py).

`lookahead-knobs` is a knob controller: every `interval_s` it forks a simulator of the current
state and rolls out each setting of a small grid of the base heuristic's knobs (least-work's
backlog/queue/KV weights, or HexGen's alpha) over the next `horizon_s`, adopts the best if it beats
the current setting (by more than `margin` workflows), and logs each decision with its predicted
gain (python logging, logger `policies.lookahead`). The search (`plan_interval`) and the change
(`adopt_plan`) are the `Policy` interface's planner hooks (`plans_on_twin`): in `simulate` the
simulator plans on itself at each tick; the gateway plans on its digital twin
(`envs.sim.fork.simulator_from_view` of its live state) in a worker thread and adopts the new knobs
on its event loop (deploy/gateway/core.py, `Gateway._plan_on_twin`).

`lookahead` needs the simulator at every dispatch; in `simulate` the view handed to a policy is
the `ClusterSimulator` itself, and any other view (the gateway's `ClusterState`) gets the base
policy's decision (a twin per dispatch would cost more than the decision is worth there).

Names: `lookahead` and `lookahead-knobs` (base: least-work+workflow), `lookahead:BASE`,
`lookahead-knobs:BASE`, with knob overrides after `@`: `lookahead:least-work+workflow@horizon_s=30,samples=2`;
or a policy file of `kind: lookahead-knobs` (`LookaheadKnobsFile`).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from envs.sim.cluster import ClusterSimulator
from envs.sim.fork import ARRIVAL_SOURCES, LENGTH_SOURCES, ArrivalSource, LengthSource, fork
from envs.sim.view import CallView, ClusterView, EngineView
from heuristics.dispatch import LeastWork, WorkloadBalanced
from policies.base import IntervalDecision, Policy, PolicyError
from policies.heuristic import HeuristicPolicy

LOG = logging.getLogger(__name__)
DEFAULT_BASE = "least-work+workflow"
LATENESS_WEIGHT_PER_S = 1e-4  # a workflow met outweighs any lateness a horizon of minutes can add
LOOKAHEAD_NAMES = ("lookahead", "lookahead-knobs")


def rollout_score(twin: ClusterSimulator, until_s: float, first_open: int) -> float:
    """Run `twin` with its own policy (admission and dispatch) until `until_s`; the workflows from `first_open` on that met
    their SLO or are still on track (the standard workflow's remaining solo time, from `until_s`,
    fits before the deadline), minus LATENESS_WEIGHT_PER_S x their lateness (finish past the
    deadline; projected the same way for those still running). Counting the on-track ones makes
    a horizon shorter than a workflow meaningful."""
    twin.run(until_s=until_s)
    met = 0
    late_s = 0.0
    for wf in twin.workflows[first_open:]:
        if wf.done:
            if wf.met_slo:
                met += 1
            else:
                late_s += max(0.0, wf.finish_time_s - wf.deadline_s)
        else:
            if until_s + wf.expected_remaining_s <= wf.deadline_s:
                met += 1  # on track: its standard remaining work still fits before its deadline
            late_s += max(0.0, until_s + wf.expected_remaining_s - wf.deadline_s)
    return met - LATENESS_WEIGHT_PER_S * late_s


def first_open_workflow(sim: ClusterSimulator) -> int:
    """Index of the oldest workflow not finished yet (every later one counts in the objective)."""
    for i, wf in enumerate(sim.workflows):
        if not wf.done:
            return i
    return len(sim.workflows)


class LookaheadPolicy(Policy):
    """Per-decision rollouts over forked simulators (see the module docstring)."""

    def __init__(self, base: Policy, horizon_s: float = 30.0, samples: int = 2, top_k: int = 2, seed: int = 0,
                 clairvoyant: bool = False, margin: float = 0.5, name: str | None = None,
                 arrivals: str = "model", lengths: str = "median") -> None:
        """`arrivals`: where a fork's future arrivals come from (`envs.sim.fork.fork`): "model", the
        run's arrival process (a step or burst forecast), "recent", Poisson at the recent rate, or
        "known", the run's true future arrivals (not deployable: an experiment). `lengths`: "sample"
        draws unknown output lengths, "median" uses their conditional median (a point forecast)."""
        if horizon_s < 0 or samples < 1 or top_k < 1 or margin < 0:
            raise PolicyError("lookahead: needs horizon_s >= 0, samples >= 1, top_k >= 1 and margin >= 0")
        if arrivals not in ARRIVAL_SOURCES:
            raise PolicyError(f"lookahead: arrivals must be one of {', '.join(ARRIVAL_SOURCES)}, got {arrivals!r}")
        if lengths not in LENGTH_SOURCES:
            raise PolicyError(f"lookahead: lengths must be one of {', '.join(LENGTH_SOURCES)}, got {lengths!r}")
        self.lengths = cast(LengthSource, lengths)
        self.arrivals = cast(ArrivalSource, arrivals)
        self.margin = float(margin)
        self.base = base
        self.horizon_s = float(horizon_s)
        self.samples = int(samples)
        self.top_k = int(top_k)
        self.seed = int(seed)
        self.clairvoyant = bool(clairvoyant)
        self.name = name or f"lookahead:{base.name}"
        self.interval_s = base.interval_s
        self.decision_ms: list[float] = []  # wall time of every planned decision
        self.changed = 0  # decisions where the plan overrode the base policy
        self._decisions = 0

    def admit(self, call: CallView, cluster: ClusterView) -> bool:
        return self.base.admit(call, cluster)

    def queue_key(self, call: CallView, engine: EngineView) -> float:
        return self.base.queue_key(call, engine)

    def bind(self, cluster: ClusterView) -> None:
        self.base.bind(cluster)

    def on_interval(self, cluster: ClusterView) -> None:
        self.base.on_interval(cluster)

    def reset(self) -> None:
        self.base.reset()
        self.decision_ms = []
        self.changed = 0
        self._decisions = 0

    def candidates(self, call: CallView, cluster: ClusterView, choice: int) -> list[int]:
        """The base's choice, then the other healthy engines by the base's earliest-finish score
        (least-work's own weights when the base dispatches by least-work; plain outstanding work +
        T_e otherwise), `top_k` in all."""
        dispatcher = self.base.dispatcher if isinstance(self.base, HeuristicPolicy) else None
        if isinstance(dispatcher, LeastWork):
            b, q, k = dispatcher.backlog_weight, dispatcher.queue_weight, dispatcher.kv_weight
        else:
            b, q, k = 1.0, 0.0, 0.0
        others = [(b * e.outstanding_work_s + e.expected_call_latency_s(call) * (1 + q * e.num_waiting + k * e.kv_usage), i)
                  for i, e in enumerate(cluster.engines) if e.healthy and i != choice]
        others.sort()
        return [choice] + [i for _, i in others[: self.top_k - 1]]

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        choice = self.base.dispatch(call, cluster)
        if self.horizon_s <= 0 or self.top_k < 2 or not isinstance(cluster, ClusterSimulator):
            return choice
        started = time.perf_counter()
        engines = self.candidates(call, cluster, choice)
        if len(engines) < 2:
            return choice
        self._decisions += 1
        until_s = cluster.now_s + self.horizon_s
        first_open = first_open_workflow(cluster)
        base_policy = copy.deepcopy(self.base)  # rollouts never move the base's own state
        scores = np.zeros(len(engines))
        for s in range(self.samples):
            sample_seed = (self.seed * 1_000_003 + self._decisions) * 64 + s
            for j, engine_id in enumerate(engines):
                twin = fork(cluster, sample_seed, resample=not self.clairvoyant, policy=copy.deepcopy(base_policy),
                            until_s=until_s, arrivals=self.arrivals, lengths=self.lengths)
                ready = twin.next_decision()
                assert ready is not None, "the fork holds the copy of `call`, still first in line"
                twin.dispatch(ready, engine_id)
                scores[j] += rollout_score(twin, until_s, first_open)
        scores /= self.samples
        best = int(np.argmax(scores))  # first maximum: the base's choice on ties
        if scores[best] <= scores[0] + self.margin:
            best = 0
        self.decision_ms.append((time.perf_counter() - started) * 1e3)
        if best != 0:
            self.changed += 1
        return engines[best]

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base.name, "horizon_s": self.horizon_s, "samples": self.samples,
                "top_k": self.top_k, "seed": self.seed, "clairvoyant": self.clairvoyant, "margin": self.margin,
                "arrivals": self.arrivals, "lengths": self.lengths}


def knob_grid(policy: HeuristicPolicy) -> list[dict[str, float]]:
    """The settings `lookahead-knobs` compares around the dispatcher's current knobs: the current
    one first, then each tunable weight halved and doubled (least-work: backlog, queue and KV
    weights; HexGen's workload-balanced: alpha moved by 0.15 either way, within 0..1)."""
    d = policy.dispatcher
    if isinstance(d, LeastWork):
        now = {"backlog_weight": d.backlog_weight, "queue_weight": d.queue_weight, "kv_weight": d.kv_weight}
        grid = [now]
        for knob in now:
            for factor in (0.5, 2.0):
                value = now[knob] * factor if now[knob] > 0 else (0.5 if factor > 1 else 0.0)
                if value != now[knob]:
                    grid.append({**now, knob: value})
        return grid
    if isinstance(d, WorkloadBalanced):
        alpha = d.alpha
        return [{"alpha": alpha}] + [{"alpha": a} for a in (max(0.0, alpha - 0.15), min(1.0, alpha + 0.15)) if a != alpha]
    raise PolicyError(f"lookahead-knobs: base dispatcher {d.name!r} has no knob grid (use least-work or workload-balanced)")


class LookaheadKnobsPolicy(Policy):
    """Every `interval_s`, adopt the knob setting of the base heuristic with the best predicted
    objective over `horizon_s` (rollouts of forked simulators, common random numbers).

    The search (`plan_interval`) and the change (`adopt_plan`) are apart: in `simulate` the
    simulator's tick runs both on the simulator itself; the gateway plans on its digital twin in a
    worker thread and adopts on its event loop (`Policy.plans_on_twin`)."""

    plans_on_twin = True

    def __init__(self, base: Policy, interval_s: float = 60.0, horizon_s: float = 120.0, samples: int = 2,
                 seed: int = 0, clairvoyant: bool = False, name: str | None = None,
                 knobs: dict[str, float] | None = None, margin: float = 0.0) -> None:
        """`knobs`: the base dispatcher's starting knobs (default: the base's own). `margin`: a
        setting replaces the current one only if it predicts more than this many more SLO-met
        workflows (0: any gain, lateness included, moves the knobs)."""
        if not isinstance(base, HeuristicPolicy):
            raise PolicyError("lookahead-knobs: the base must be a heuristic policy (its knobs are tuned)")
        for knob, value in (("interval_s", interval_s), ("horizon_s", horizon_s)):
            if not value > 0:
                raise PolicyError(f"lookahead-knobs: {knob} must be > 0 seconds, got {value}")
        if samples < 1:
            raise PolicyError(f"lookahead-knobs: samples must be >= 1, got {samples}")
        if not margin >= 0:
            raise PolicyError(f"lookahead-knobs: margin must be >= 0 workflows, got {margin}")
        self.margin = float(margin)
        knob_grid(base)  # fails early for a dispatcher without a grid
        self.base = base
        if knobs:
            current = base.dispatcher.get_knobs()
            unknown = sorted(set(knobs) - set(current))
            if unknown:
                raise PolicyError(f"lookahead-knobs: knobs: {base.dispatcher.name} has no knob {unknown[0]!r} "
                                  f"(knobs: {', '.join(current)})")
            try:  # the dispatcher's own validation of the values
                type(base.dispatcher)(**{**current, **knobs})
            except (TypeError, ValueError) as exc:
                raise PolicyError(f"lookahead-knobs: knobs: {exc}") from None
            self._set(knobs)
        self.interval_s = float(interval_s)
        self.horizon_s = float(horizon_s)
        self.samples = int(samples)
        self.seed = int(seed)
        self.clairvoyant = bool(clairvoyant)
        self.name = name or f"lookahead-knobs:{base.name}"
        self._initial = dict(base.dispatcher.get_knobs())
        self.log: list[dict[str, Any]] = []  # every decision: time, adopted knobs, predicted gain

    def admit(self, call: CallView, cluster: ClusterView) -> bool:
        return self.base.admit(call, cluster)

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        return self.base.dispatch(call, cluster)

    def queue_key(self, call: CallView, engine: EngineView) -> float:
        return self.base.queue_key(call, engine)

    def reset(self) -> None:
        self.base.reset()
        self._set(self._initial)
        self.log = []

    def _set(self, knobs: dict[str, Any]) -> None:
        for knob, value in knobs.items():
            setattr(self.base.dispatcher, knob, value)

    def on_interval(self, cluster: ClusterView) -> None:
        """In `simulate` the view is the simulator itself: plan on it and adopt at once. Another
        view (this policy as a part of a combined one in the gateway) leaves the knobs as they are."""
        if not isinstance(cluster, ClusterSimulator) or cluster.done:
            return
        self.adopt_plan(self.plan_interval(cluster))

    def plan_interval(self, twin: ClusterSimulator) -> IntervalDecision:
        """Roll out every setting of the knob grid from `twin`, `samples` forks each (the same
        seeds for every setting), until `horizon_s` from now; the best mean objective wins, the
        current setting on ties. Reads the base's knobs and the decision count, changes nothing."""
        started = time.perf_counter()
        decision_index = len(self.log) + 1
        grid = knob_grid(self.base)
        base = copy.deepcopy(self.base)  # one copy per plan; every candidate is a copy of it
        until_s = twin.now_s + self.horizon_s
        first_open = first_open_workflow(twin)
        scores = np.zeros(len(grid))
        for s in range(self.samples):
            sample_seed = (self.seed * 1_000_003 + decision_index) * 64 + s
            for j, knobs in enumerate(grid):
                candidate = copy.deepcopy(base)
                for knob, value in knobs.items():
                    setattr(candidate.dispatcher, knob, value)
                fork_sim = fork(twin, sample_seed, resample=not self.clairvoyant, policy=candidate, until_s=until_s)
                scores[j] += rollout_score(fork_sim, until_s, first_open)
        scores /= self.samples
        best = int(np.argmax(scores))  # first maximum: the current setting on ties
        if scores[best] <= scores[0] + self.margin:
            best = 0
        return IntervalDecision(time_s=twin.now_s, knobs=dict(grid[best]), current_knobs=dict(grid[0]),
                                changed=best != 0, predicted_objective=float(scores[best]),
                                current_objective=float(scores[0]), horizon_s=self.horizon_s,
                                decision_s=time.perf_counter() - started)

    def adopt_plan(self, decision: IntervalDecision | None) -> None:
        if decision is None:
            return
        entry = {"time_s": decision.time_s, "knobs": decision.knobs, "predicted_gain": decision.predicted_gain,
                 "changed": decision.changed, "decision_s": decision.decision_s}
        self.log.append(entry)
        LOG.info("lookahead-knobs t=%.0fs: %s knobs %s (predicted objective %+.3f over the current setting)",
                 decision.time_s, "adopt" if decision.changed else "keep", decision.knobs, decision.predicted_gain)
        if decision.changed:
            self._set(decision.knobs)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "lookahead-knobs", "base": self.base.name, "interval_s": self.interval_s,
                "horizon_s": self.horizon_s, "samples": self.samples, "seed": self.seed,
                "clairvoyant": self.clairvoyant, "margin": self.margin, "knobs": self.base.dispatcher.get_knobs()}


def _flag(text: str) -> bool:
    word = text.lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _one_of(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(text)
        return text
    return parse


_KNOB_TYPES: dict[str, Callable[[str], Any]] = {
    "horizon_s": float, "samples": int, "top_k": int, "seed": int, "interval_s": float, "margin": float,
    "clairvoyant": _flag, "arrivals": _one_of(ARRIVAL_SOURCES), "lengths": _one_of(LENGTH_SOURCES),
}
_KNOB_VALUES = {"clairvoyant": "true or false", "arrivals": "one of " + ", ".join(ARRIVAL_SOURCES),
                "lengths": "one of " + ", ".join(LENGTH_SOURCES)}  # default: a number


_KIND_KNOBS = {"lookahead": ("horizon_s", "samples", "top_k", "seed", "clairvoyant", "margin", "arrivals", "lengths"),
               "lookahead-knobs": ("interval_s", "horizon_s", "samples", "seed", "clairvoyant", "margin")}


def is_lookahead_name(text: str) -> bool:
    return text.split("@", 1)[0].split(":", 1)[0] in LOOKAHEAD_NAMES


def lookahead_from_name(text: str, load_base: Callable[[str], Policy]) -> Policy:
    """`lookahead[:BASE][@knob=value,...]` or `lookahead-knobs[:BASE][@...]`."""
    head, _, knob_text = text.partition("@")
    kind, _, base_name = head.partition(":")
    knobs: dict[str, Any] = {}
    for item in filter(None, knob_text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _KNOB_TYPES:
            raise PolicyError(f"policy: {text}: bad knob {item!r} (use @knob=value with knobs "
                              f"{', '.join(_KNOB_TYPES)})")
        try:
            knobs[key] = _KNOB_TYPES[key](value)
        except ValueError:
            kind_of = _KNOB_VALUES.get(key, "a number")
            raise PolicyError(f"policy: {text}: knob {key} needs {kind_of}, got {value!r}") from None
    allowed = _KIND_KNOBS[kind]
    for key in knobs:
        if key not in allowed:
            raise PolicyError(f"policy: {text}: {kind} has no knob {key!r} (knobs: {', '.join(allowed)})")
    base = load_base(base_name or DEFAULT_BASE)
    if kind == "lookahead":
        return LookaheadPolicy(base, **knobs)
    return LookaheadKnobsPolicy(base, **knobs)


class LookaheadKnobsFile(BaseModel):
    """A `lookahead-knobs` policy file (`kind: lookahead-knobs`); `knobs` are the base dispatcher's
    starting knobs (the `spec()` of a running controller writes the ones it adopted)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["lookahead-knobs"]
    name: str | None = None
    base: str = DEFAULT_BASE
    interval_s: PositiveFloat = 60.0
    horizon_s: PositiveFloat = 120.0
    samples: PositiveInt = 2
    seed: int = 0
    clairvoyant: bool = False
    margin: float = Field(0.0, ge=0.0)
    knobs: dict[str, float] = {}


def lookahead_from_spec(spec: dict[str, Any], load_base: Callable[[str], Policy], source: str) -> Policy:
    """A policy file of kind `lookahead-knobs` (fields of `LookaheadKnobsFile`)."""
    try:
        cfg = LookaheadKnobsFile.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "file"
        raise PolicyError(f"{source}: {field}: {err['msg']}") from None
    return LookaheadKnobsPolicy(load_base(cfg.base), interval_s=cfg.interval_s, horizon_s=cfg.horizon_s,
                                samples=cfg.samples, seed=cfg.seed, clairvoyant=cfg.clairvoyant, name=cfg.name,
                                knobs=cfg.knobs, margin=cfg.margin)
