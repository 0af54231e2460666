"""The workflow-aware schedulers of the field, as dispatchers and local orders over the read-only view.

Each class gives its source and says which constants are published and which are ours (picked here,
documented, and exposed as knobs with an Optuna search space so `agentsched tune` can set them).
What none of them can do here: preempt a running call on a timer (the engines are vLLM's: a call
runs until it finishes or the KV cache forces a recompute preemption, which evicts the running
call with the largest key). Keys are computed when a call is enqueued and never change (engine
queues are heaps); where a published rule changes a waiting call's priority over time, the
docstring says how it is encoded as a fixed key.

Orders whose key reads workflow state set `needs_cluster`: the policy binds the live cluster view
before each dispatch. Without a binding (a local order used on its own) they fall back to
first come, first served.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

from envs.sim.view import CallView, ClusterView, EngineView, WorkflowView
from heuristics.base import (
    Dispatcher,
    LocalOrder,
    NoHealthyEngine,
    check_int,
    check_non_negative,
    check_unit_interval,
)
from heuristics.dispatch import least_loaded

# per-run maps keyed by workflow or call id are cut back to their newest half past this size, so a
# gateway that runs for days does not grow them without bound (simulations never reach it)
MAX_TRACKED = 100_000


def _trim(table: dict[int, Any]) -> None:
    if len(table) > MAX_TRACKED:
        for key in list(table)[: len(table) // 2]:
            del table[key]


class _WorkflowOrder(LocalOrder):
    """A local order whose key reads the call's workflow from the bound cluster view."""

    needs_cluster = True

    def __init__(self) -> None:
        self._cluster: ClusterView | None = None

    def bind(self, cluster: ClusterView) -> None:
        self._cluster = cluster

    def reset(self) -> None:
        self._cluster = None

    def _workflow(self, call: CallView) -> WorkflowView | None:
        return self._cluster.workflow(call.workflow_id) if self._cluster is not None else None


# ---- Autellix (Luo et al., arXiv 2502.13965) --------------------------------------------------------

class AutellixLoadBalancer(Dispatcher):
    """Autellix's load balancer: a call with at most `long_prompt_tokens` prompt tokens goes to the
    least-loaded engine; a longer one goes to the engine that served its workflow before (its KV
    prefix is there), or to the least-loaded engine if the workflow has none yet or that engine is
    down. Load = running + waiting calls.

    Published: the rule and the 2048-token threshold (arXiv 2502.13965, section on the load
    balancer). Ours: "served before" = the engine of the workflow's most recent call, kept in this
    dispatcher's per-run state (reset() clears it)."""

    name = "autellix-lb"
    knobs = ("long_prompt_tokens",)
    search_space = {"long_prompt_tokens": ("categorical", (512, 1024, 2048, 4096, 8192, 16384))}

    def __init__(self, long_prompt_tokens: int = 2048) -> None:
        self.long_prompt_tokens = check_int("long_prompt_tokens", long_prompt_tokens)
        if self.long_prompt_tokens < 0:
            raise ValueError(f"long_prompt_tokens must be >= 0, got {long_prompt_tokens!r}")
        self._engine_of: dict[int, int] = {}

    def reset(self) -> None:
        self._engine_of = {}

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        engine = -1
        if call.input_tokens > self.long_prompt_tokens:
            before = self._engine_of.get(call.workflow_id, -1)
            if before >= 0 and cluster.engines[before].healthy:
                engine = before
        if engine < 0:
            engine = least_loaded(cluster)
        self._engine_of[call.workflow_id] = engine
        _trim(self._engine_of)
        return engine


class _LeastAttainedService(_WorkflowOrder):
    """Autellix's program-level least attained service, discretised into multi-level queues.

    Published (arXiv 2502.13965): a call's priority is its program's (workflow's) attained service;
    the service is discretised into K queues with increasing thresholds, a call enters the queue of
    its program's service, FCFS within a queue, and a call that has waited long relative to its
    program's service (wait / service >= the starvation ratio) is promoted to the top queue.
    Ours (the paper leaves them as parameters): K = `num_queues` (8), thresholds
    `first_threshold_s` x `threshold_ratio`^k (2 s, doubling), starvation ratio 2.

    Time-invariant encoding: level L has lower threshold q_L (q_0 = 0); the key is
        ready_time + starvation_ratio x q_L.
    Within a level that is FCFS. Across levels a call of level L waits behind calls of lower levels
    that became ready up to starvation_ratio x q_L seconds after it, and ahead of later ones: it is
    "promoted" once its wait reaches starvation_ratio x its (discretised) service, which is the
    paper's anti-starvation bound. The approximation: a promoted call is not put at the head of the
    top queue but competes there by its own readiness time (the same as the paper's FCFS in Q1 for
    calls promoted in readiness order). No quantum-based preemption of running calls (see module)."""

    knobs = ("num_queues", "first_threshold_s", "threshold_ratio", "starvation_ratio")
    search_space = {"num_queues": ("categorical", (2, 4, 8, 16)), "first_threshold_s": ("float", 0.5, 60.0),
                    "threshold_ratio": ("float", 1.5, 4.0), "starvation_ratio": ("float", 0.0, 20.0)}

    def __init__(self, num_queues: int = 8, first_threshold_s: float = 2.0, threshold_ratio: float = 2.0,
                 starvation_ratio: float = 2.0) -> None:
        super().__init__()
        self.num_queues = check_int("num_queues", num_queues)
        if self.num_queues < 1:
            raise ValueError(f"num_queues must be >= 1, got {num_queues!r}")
        self.first_threshold_s = check_non_negative("first_threshold_s", first_threshold_s)
        self.threshold_ratio = check_non_negative("threshold_ratio", threshold_ratio)
        if self.threshold_ratio < 1.0:
            raise ValueError(f"threshold_ratio must be >= 1 (thresholds increase), got {threshold_ratio!r}")
        self.starvation_ratio = check_non_negative("starvation_ratio", starvation_ratio)
        self._thresholds = [self.first_threshold_s * self.threshold_ratio ** k for k in range(self.num_queues - 1)]

    @abstractmethod
    def service_s(self, workflow: WorkflowView) -> float:
        """The workflow's attained service this order ranks by (PLAS: total; ATLAS: critical path)."""

    def level_threshold_s(self, service_s: float) -> float:
        """Lower threshold of the queue a workflow with this attained service is in (0 for the top queue)."""
        q = 0.0
        for t in self._thresholds:
            if service_s < t:
                break
            q = t
        return q

    def key(self, call: CallView, engine: EngineView) -> float:
        wf = self._workflow(call)
        if wf is None:
            return call.ready_time_s
        return call.ready_time_s + self.starvation_ratio * self.level_threshold_s(self.service_s(wf))


class ProgramLevelAttainedService(_LeastAttainedService):
    __doc__ = "PLAS: the workflow's cumulative attained service (engine time of its finished calls).\n\n" + (
        _LeastAttainedService.__doc__ or "")
    name = "plas"

    def service_s(self, workflow: WorkflowView) -> float:
        return workflow.attained_service_s


class AdaptiveThreadLevelAttainedService(_LeastAttainedService):
    __doc__ = ("ATLAS: the attained service along the critical path of the workflow's DAG, for programs "
               "with parallel calls (a fan-out stage counts its longest call, not the sum).\n\n"
               + (_LeastAttainedService.__doc__ or ""))
    name = "atlas"

    def service_s(self, workflow: WorkflowView) -> float:
        return workflow.critical_path_service_s


# ---- Kairos (Chen et al., arXiv 2508.06948) ---------------------------------------------------------

class KairosMemoryDispatch(Dispatcher):
    """Kairos's memory-aware dispatcher: send the call to an engine whose free KV cache fits it,
    to avoid overloading GPU memory; among those the one with the most free KV (then fewest calls);
    if none fits, the one with the most free KV.

    Published (arXiv 2508.06948): dispatch by the requests' memory demand to avoid GPU overload.
    Ours: the view gives each engine's KV use as a share, not in tokens, so "fits" is "at least
    `min_free_kv` of the cache is free" (0.2). Kairos targets replicas of one shared LLM: the rule
    does not look at engine speed."""

    name = "kairos-memory"
    knobs = ("min_free_kv",)
    search_space = {"min_free_kv": ("float", 0.0, 0.9)}

    def __init__(self, min_free_kv: float = 0.2) -> None:
        self.min_free_kv = check_unit_interval("min_free_kv", min_free_kv)

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        best, best_score = -1, (-math.inf, -math.inf, -math.inf)
        for i, e in enumerate(cluster.engines):
            if e.healthy:
                free = 1.0 - e.kv_usage
                score = (float(free >= self.min_free_kv), free, -float(e.num_running + e.num_waiting))
                if score > best_score:
                    best, best_score = i, score
        if best < 0:
            raise NoHealthyEngine("no healthy engine")
        return best


class KairosPriority(_WorkflowOrder):
    """Kairos's workflow-aware priority: shortest predicted remaining workflow latency first.

    remaining = T_e(s) (this call on this engine) + the workflow's expected solo seconds still
    ahead after this stage; key = remaining + `age_weight` x ready_time (fixed at enqueue).
    Published (arXiv 2508.06948): priority by the requests' remaining latency from online workflow
    analysis. Ours: the prediction is the view's standard-workflow remaining time (Kairos learns
    per-agent latencies online); `age_weight` (0 = the paper's pure order) blends in FCFS as an
    anti-starvation knob."""

    name = "kairos-priority"
    knobs = ("age_weight",)
    search_space = {"age_weight": ("float", 0.0, 2.0)}

    def __init__(self, age_weight: float = 0.0) -> None:
        super().__init__()
        self.age_weight = check_non_negative("age_weight", age_weight)

    def key(self, call: CallView, engine: EngineView) -> float:
        wf = self._workflow(call)
        if wf is None:
            return call.ready_time_s
        return engine.expected_latency_s(call.step) + wf.expected_remaining_s + self.age_weight * call.ready_time_s


# ---- Parrot (Lin et al., OSDI'24, "Parrot: Efficient Serving of LLM-based Applications with Semantic Variable")

class ParrotPlacement(Dispatcher):
    """Parrot's context-aware placement: calls of one application (workflow) are co-located on the
    engine that served it before, so their shared context stays in one engine's cache; the first
    call, or one whose engine is down or has more than `max_waiting` calls queued, goes to the
    least-loaded engine. A latency-critical call (its slack, deadline - now - T_e(s), is under
    `critical_slack` x T_e(s)) only goes to engines running fewer than `batch_cap` calls, when one
    exists: Parrot caps the batch of engines that run latency-critical requests.

    Published (OSDI'24): application-aware co-location and the latency-bound batch cap (there
    applied by the engine; the view cannot change an engine's batch limit, so here it filters
    where latency-critical calls go). Ours: `max_waiting` 4, `critical_slack` 1, `batch_cap` 8."""

    name = "parrot-colocate"
    knobs = ("max_waiting", "critical_slack", "batch_cap")
    search_space = {"max_waiting": ("categorical", (0, 1, 2, 4, 8, 16, 64)), "critical_slack": ("float", 0.0, 4.0),
                    "batch_cap": ("categorical", (2, 4, 8, 16, 32))}

    def __init__(self, max_waiting: int = 4, critical_slack: float = 1.0, batch_cap: int = 8) -> None:
        self.max_waiting = check_int("max_waiting", max_waiting)
        self.critical_slack = check_non_negative("critical_slack", critical_slack)
        self.batch_cap = check_int("batch_cap", batch_cap)
        if self.max_waiting < 0 or self.batch_cap < 1:
            raise ValueError(f"max_waiting must be >= 0 and batch_cap >= 1, got {max_waiting!r}, {batch_cap!r}")
        self._engine_of: dict[int, int] = {}

    def reset(self) -> None:
        self._engine_of = {}

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        engines = cluster.engines
        allowed = [i for i, e in enumerate(engines) if e.healthy]
        if not allowed:
            raise NoHealthyEngine("no healthy engine")
        # latency-critical: judged on the fastest healthy engine for this step
        t_best = min(engines[i].expected_latency_s(call.step) for i in allowed)
        if call.deadline_s - cluster.now_s - t_best < self.critical_slack * t_best:
            capped = [i for i in allowed if engines[i].num_running < self.batch_cap]
            allowed = capped or allowed
        before = self._engine_of.get(call.workflow_id, -1)
        if before in allowed and engines[before].num_waiting <= self.max_waiting:
            engine = before
        else:
            engine = least_loaded(cluster, allowed)
        self._engine_of[call.workflow_id] = engine
        _trim(self._engine_of)
        return engine


class ApplicationFIFO(_WorkflowOrder):
    """Parrot's application-centric order: calls of the application (workflow) that arrived first
    are admitted first, so an application's chain finishes before the next one's calls start
    (key = the workflow's arrival time). Published: OSDI'24 (app-level FIFO over its DAG)."""

    name = "app-fifo"

    def key(self, call: CallView, engine: EngineView) -> float:
        wf = self._workflow(call)
        return wf.arrival_time_s if wf is not None else call.ready_time_s


# ---- Justitia (Yang et al., arXiv 2510.17015) -------------------------------------------------------

class JustitiaVirtualFinish(_WorkflowOrder):
    """Justitia: serve workflows one by one in the order they would finish under idealised fair
    sharing ("saturated serving in fair completion order"), with a memory-centric cost.

    Virtual time V advances at engine_rate x healthy engines / active workflows per second (each
    active workflow's fair share of a cluster that serves `engine_rate` cost units per engine per
    second). A workflow gets its virtual finish time once, when its first call is enqueued:
        F_w = V(now) + C_w,   C_w = (T_e(s) + expected_remaining_s) x r_w,
    the predicted solo time of the workflow on the reference engine times r_w, its first call's KV
    footprint (prompt + output tokens) over the mean footprint of that step seen so far: cost =
    KV footprint x time, predicted from the step's means. Every call of the workflow has key F_w.

    Published (arXiv 2510.17015): memory-centric cost, virtual-time fair queuing, order by virtual
    finish time. Ours: the cost predictor (Justitia trains a small MLP on the application's input;
    the view has no such model, so the first call's footprint relative to its step's mean stands
    in), and `engine_rate` (1 cost unit per engine-second)."""

    name = "justitia-vft"
    knobs = ("engine_rate",)
    search_space = {"engine_rate": ("float", 0.05, 32.0)}

    def __init__(self, engine_rate: float = 1.0) -> None:
        super().__init__()
        self.engine_rate = check_non_negative("engine_rate", engine_rate)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.virtual_time = 0.0
        self._last_s = 0.0
        self._finish_of: dict[int, float] = {}
        self._footprint_sum: dict[str, float] = {}
        self._footprint_n: dict[str, int] = {}

    def _advance(self, cluster: ClusterView) -> None:
        now = cluster.now_s
        if now > self._last_s:
            active = max(1, len(cluster.workflows) - cluster.finished_workflows)
            n_healthy = sum(1 for e in cluster.engines if e.healthy)
            self.virtual_time += (now - self._last_s) * self.engine_rate * n_healthy / active
            self._last_s = now

    def key(self, call: CallView, engine: EngineView) -> float:
        cluster = self._cluster
        if cluster is None:
            return call.ready_time_s
        footprint = float(call.input_tokens + call.output_tokens)
        step = call.step
        self._footprint_sum[step] = self._footprint_sum.get(step, 0.0) + footprint
        self._footprint_n[step] = self._footprint_n.get(step, 0) + 1
        finish = self._finish_of.get(call.workflow_id)
        if finish is None:
            self._advance(cluster)
            mean = self._footprint_sum[step] / self._footprint_n[step]
            ratio = footprint / mean if mean > 0 else 1.0
            wf = cluster.workflow(call.workflow_id)
            finish = self.virtual_time + (engine.expected_latency_s(step) + wf.expected_remaining_s) * ratio
            self._finish_of[call.workflow_id] = finish
            _trim(self._finish_of)
        return finish


# ---- HexAGenT (arXiv 2605.16637, from the HexGen authors) --------------------------------------------

class HexagentRisk(_WorkflowOrder):
    """HexAGenT's risk order: admit first the call whose workflow is most at risk of missing its
    completion horizon, projected from the workflow's standalone remaining time:
        risk = now + remaining_weight x (T_e(s) + expected_remaining_s) - workflow deadline,
    and as `now` is common to all waiting calls, key = workflow deadline - remaining_weight x
    (T_e(s) + expected_remaining_s) (fixed at enqueue).

    Published (arXiv 2605.16637): workflow-level risk from the standalone remaining time against
    the end-to-end horizon, with HexGen's heterogeneity-aware workload balance for dispatch. Ours:
    the linear risk (a ratio-shaped risk would reorder waiting calls as time passes, which a heap
    cannot follow) and `remaining_weight` (1)."""

    name = "hexagent-risk"
    knobs = ("remaining_weight",)
    search_space = {"remaining_weight": ("float", 0.0, 3.0)}

    def __init__(self, remaining_weight: float = 1.0) -> None:
        super().__init__()
        self.remaining_weight = check_non_negative("remaining_weight", remaining_weight)

    def key(self, call: CallView, engine: EngineView) -> float:
        wf = self._workflow(call)
        if wf is None:
            return call.deadline_s - engine.expected_latency_s(call.step)
        remaining = engine.expected_latency_s(call.step) + wf.expected_remaining_s
        return call.workflow_deadline_s - self.remaining_weight * remaining


__all__ = [
    "AdaptiveThreadLevelAttainedService",
    "ApplicationFIFO",
    "AutellixLoadBalancer",
    "HexagentRisk",
    "JustitiaVirtualFinish",
    "KairosMemoryDispatch",
    "KairosPriority",
    "ParrotPlacement",
    "ProgramLevelAttainedService",
]
