"""Global dispatchers: which engine gets a call that just became ready.

Every dispatcher only reads the `ClusterView`/`EngineView` protocols, never picks an engine with
`healthy=False`, and breaks score ties by the lowest engine index (deterministic), unless its
definition says otherwise (llm-d picks randomly among ties, seeded here).
"""

from __future__ import annotations

import math
import random
from typing import Any, ClassVar, Iterable

from envs.sim.view import CallView, ClusterView, EngineView
from heuristics.base import Dispatcher, NoHealthyEngine, check_choice, check_int, check_non_negative, check_unit_interval


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
        raise NoHealthyEngine("no healthy engine")


class RandomDispatch(Dispatcher):
    """Uniformly random healthy engine: the no-information baseline. Seeded so runs repeat."""

    name = "random"
    knobs = ("seed",)

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int("seed", seed)
        self._rng = random.Random(self.seed)

    def reset(self) -> None:
        self._rng = random.Random(self.seed)

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        healthy = [i for i, e in enumerate(cluster.engines) if e.healthy]
        if not healthy:
            raise NoHealthyEngine("no healthy engine")
        return healthy[self._rng.randrange(len(healthy))]


class LeastOutstandingRequests(Dispatcher):
    """Fewest calls on the engine (running + waiting): Vidur's and vLLM production-stack's
    load-aware router. Blind to engine speed and to how long each call is."""

    name = "least-outstanding"

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        return least_loaded(cluster)


def least_loaded(cluster: ClusterView, candidates: Iterable[int] | None = None) -> int:
    """Fewest running + waiting calls (lowest index on ties) among `candidates` (default: all),
    healthy engines only."""
    engines = cluster.engines
    best, best_n = -1, 1 << 62
    for i in (candidates if candidates is not None else range(len(engines))):
        e = engines[i]
        if e.healthy:
            n = e.num_running + e.num_waiting
            if n < best_n:
                best, best_n = i, n
    if best < 0:
        raise NoHealthyEngine("no healthy engine")
    return best


class LeastWork(Dispatcher):
    """Earliest expected finish: the engine minimising

        backlog_weight x outstanding work + T_e(s) x (1 + queue_weight x waiting calls + kv_weight x KV use)

    `outstanding_work_s` is already in that engine's own solo seconds (each call's T_e(s) when it
    was placed), so it is normalised by the engine's speed: a call of 10 s on an A6000 counts
    twice what it counts on an A100. But solo seconds over-estimate how long a batching engine
    takes to drain its backlog: it runs many of those calls at once. `backlog_weight` < 1 is that
    correction (about 1 / the calls an engine overlaps). At weight 1 the dispatcher spreads calls
    onto slow engines too early; under overload (mixed-16 at 1.6 q/s) weight 0.07 raises
    SLO-goodput by 33-40% on tuning seeds (heuristics/README.md, "Overload").

    What a discounted backlog misses is whether the engine can take the call *now*: calls waiting
    for admission mean its batch is full (each delays this call by about `queue_weight` x T_e(s)),
    and a nearly full KV cache slows admission and risks preemption (`kv_weight`). With both terms
    one setting suits both shipped clusters, where the backlog weight alone has to be tuned for
    each. All weights at their defaults (1, 0, 0) give the plain earliest-finish rule.

    With prefix caching, T_e(s) is the call's expected latency on e given the prompt tokens e's
    cache holds now (`expected_call_latency_s`): only the prefill it must compute there counts.
    """

    name = "least-work"
    knobs = ("backlog_weight", "queue_weight", "kv_weight")
    search_space = {"backlog_weight": ("float", 0.02, 1.0), "queue_weight": ("float", 0.0, 2.0),
                    "kv_weight": ("float", 0.0, 4.0)}

    def __init__(self, backlog_weight: float = 1.0, queue_weight: float = 0.0, kv_weight: float = 0.0) -> None:
        self.backlog_weight = check_non_negative("backlog_weight", backlog_weight)
        self.queue_weight = check_non_negative("queue_weight", queue_weight)
        self.kv_weight = check_non_negative("kv_weight", kv_weight)

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        backlog, queue, kv = self.backlog_weight, self.queue_weight, self.kv_weight
        best, best_s = -1, math.inf
        for i, e in enumerate(cluster.engines):
            if e.healthy:
                finish_s = backlog * e.outstanding_work_s + e.expected_call_latency_s(call) * (
                    1.0 + queue * e.num_waiting + kv * e.kv_usage)
                if finish_s < best_s:
                    best, best_s = i, finish_s
        if best < 0:
            raise NoHealthyEngine("no healthy engine")
        return best


class WeightedScoring(Dispatcher):
    """llm-d's inference scheduler with its default scorers: queue depth and KV-cache use.

    score(e) = w_queue * (max_q - q_e) / (max_q - min_q) + w_kv * (1 - kv_usage_e), where q is the
    engine's waiting queue and the queue scorer is min-max normalised over the candidate engines
    (all ones when the queues are equal), like llm-d's queue-scorer; the highest score wins, ties
    broken at random (llm-d's max-score picker), seeded here.
    """

    name = "weighted-scoring"
    knobs: ClassVar[tuple[str, ...]] = ("queue_weight", "kv_weight", "seed")
    search_space = {"queue_weight": ("float", 0.0, 4.0), "kv_weight": ("float", 0.0, 4.0)}

    def __init__(self, queue_weight: float = 2.0, kv_weight: float = 2.0, seed: int = 0) -> None:
        self.queue_weight = check_non_negative("queue_weight", queue_weight)
        self.kv_weight = check_non_negative("kv_weight", kv_weight)
        self.seed = check_int("seed", seed)
        self._rng = random.Random(self.seed)

    def reset(self) -> None:
        self._rng = random.Random(self.seed)

    def extra_score(self, call: CallView, engine: EngineView) -> float:
        """Scorers beyond queue and KV (llm-d's prefix-cache scorer: `PrefixScoring`); none here."""
        return 0.0

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        healthy = [(i, e) for i, e in enumerate(cluster.engines) if e.healthy]
        if not healthy:
            raise NoHealthyEngine("no healthy engine")
        queues = [e.num_waiting for _, e in healthy]
        lo, hi = min(queues), max(queues)
        span = hi - lo
        best: list[int] = []
        best_score = -math.inf
        for (i, e), q in zip(healthy, queues):
            queue_score = (hi - q) / span if span else 1.0
            score = self.queue_weight * queue_score + self.kv_weight * (1.0 - e.kv_usage) + self.extra_score(call, e)
            if score > best_score + 1e-12:
                best, best_score = [i], score
            elif score >= best_score - 1e-12:
                best.append(i)
        return best[0] if len(best) == 1 else best[self._rng.randrange(len(best))]


class WorkloadBalanced(Dispatcher):
    """HexGen-Text2SQL's workload-balanced dispatcher.

    For a call of step s, pick the healthy engine maximising
        alpha * T_base(s) / T_e(s)  -  (1 - alpha) * W_e / W_base
    where T_e(s) is the expected solo latency of step s on e, W_e the work on e, and "base" the
    reference engine: the healthy engine with the smallest T_e(s). alpha=1 sends everything to the fastest
    engine; alpha=0 balances work only.

    `work="assigned"` is the paper: W_e = cumulative expected seconds ever assigned to e. It
    balances *shares* of the total work, so it never notices that an engine has drained (or that
    one just recovered from a failure with a low W: it floods it), and the load term weakens as
    W grows. `work="outstanding"` uses the expected seconds placed on e and not yet finished: the
    current backlog, which reacts to the actual state. In both, W_base is floored at T_base(s) so
    that an idle base engine does not divide by zero (and one call's worth of work stays the
    natural unit).

    With prefix caching, T_e(s) is the call's expected latency on e given the prompt tokens e's
    cache holds now (`expected_call_latency_s`): an engine that holds the prompt's prefix is faster
    for this call.
    """

    name = "workload-balanced"
    knobs = ("alpha", "work")
    search_space = {"alpha": ("float", 0.0, 1.0)}

    def __init__(self, alpha: float = 0.2, work: str = "assigned") -> None:
        self.alpha = check_unit_interval("alpha", alpha)
        self.work = check_choice("work", work, ("assigned", "outstanding"))
        self._outstanding = self.work == "outstanding"

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        engines = cluster.engines
        outstanding = self._outstanding
        lat: list[float] = []
        work: list[float] = []
        idx: list[int] = []
        base_t, base_w = math.inf, 0.0
        for i, e in enumerate(engines):
            if e.healthy:
                t = e.expected_call_latency_s(call)
                w = e.outstanding_work_s if outstanding else e.assigned_work_s
                idx.append(i)
                lat.append(t)
                work.append(w)
                if t < base_t:
                    base_t, base_w = t, w
        if not idx:
            raise NoHealthyEngine("no healthy engine")
        w_base = max(base_w, base_t)
        a_speed = self.alpha * base_t
        a_load = (1.0 - self.alpha) / w_base
        best, best_score = idx[0], -math.inf
        for i, t, w in zip(idx, lat, work):
            score = a_speed / t - a_load * w
            if score > best_score:
                best, best_score = i, score
        return best

    def scores(self, call: CallView, cluster: ClusterView) -> dict[int, float]:
        """Every healthy engine's score (for explanations and tests)."""
        healthy = [(i, e) for i, e in enumerate(cluster.engines) if e.healthy]
        base = min(healthy, key=lambda p: p[1].expected_call_latency_s(call))[1]
        base_t = base.expected_call_latency_s(call)
        base_w = base.outstanding_work_s if self._outstanding else base.assigned_work_s
        w_base = max(base_w, base_t)
        out: dict[int, float] = {}
        for i, e in healthy:
            w = e.outstanding_work_s if self._outstanding else e.assigned_work_s
            out[i] = self.alpha * base_t / e.expected_call_latency_s(call) - (1.0 - self.alpha) * w / w_base
        return out

    def get_knobs(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "work": self.work}
