"""Live cluster state as the read-only view policies see (envs/sim/view.py), kept by the gateway.

The classes here are plain objects with exactly the attributes of `CallView`, `EngineView`,
`WorkflowView` and `ClusterView`, so a policy written against the simulator runs unchanged. The
gateway mutates them; policies only read them. Times are seconds on the gateway's monotonic
clock (`time.monotonic() - start`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, overload

from deploy.cluster import Cluster, EngineSpec
from envs.sim.errors import UserError
from envs.sim.slo import REFERENCE_PATH, SLOModel
from envs.sim.workload import normalise_step

ARRIVAL_RATE_WINDOW_S = 60.0  # recent_arrival_rate_qps looks back this far
# Finished workflows stay in `ClusterState.workflows` at least this long after arrival (knob
# policies look back 300 s for burstiness), then the finished prefix is compacted away.
WORKFLOW_RETENTION_S = 900.0
DEFAULT_MAX_BATCHED_TOKENS = 8192  # vLLM's chunked-prefill budget when the profile does not say


def reference_data() -> dict:
    with open(REFERENCE_PATH) as handle:
        return json.load(handle)


def stage_tokens(token_scale: float) -> dict[str, tuple[int, int]]:
    """Mean (input, output) tokens per CHESS step, scaled like the replay scales its prompts."""
    ref = reference_data()["stage_mean_tokens"]
    return {
        step: (max(1, round(t["input_tokens"] * token_scale)), max(1, round(t["output_tokens"] * token_scale)))
        for step, t in ref.items()
    }


def engine_latency_table(spec: EngineSpec, cluster: Cluster) -> dict[str, float]:
    """Expected solo latency per step on this engine (the paper's T_e(s)).

    Sources, first that applies: the engine's explicit `latency_s`; its calibrated `profile`
    evaluated at the standard step sizes times the gateway's token scale; the reference table of
    its `gpu` type (real GPUs, unscaled tokens).
    """
    if spec.latency_s:
        return dict(spec.latency_s)
    if spec.profile:
        path = cluster.path(spec.profile)
        if path.exists():
            from envs.sim.perf import PerfProfile, ProfileModel, solo_call_latency_s

            profile = PerfProfile.load(path)
            model = ProfileModel(profile)
            overhead = profile.solo_overhead_s  # as the simulator's Engine adds it
            batched = profile.max_num_batched_tokens or DEFAULT_MAX_BATCHED_TOKENS
            return {
                step: overhead + solo_call_latency_s(model, n_in, n_out, batched)
                for step, (n_in, n_out) in stage_tokens(cluster.gateway.token_scale).items()
            }
    ref = reference_data()["latency_s"]
    if spec.gpu in ref:
        return dict(ref[spec.gpu])
    raise UserError(
        f"engine {spec.name!r}: no latency source (add `profile:` written by `agentsched calibrate`, "
        f"`latency_s:` per step, or a gpu type among {sorted(ref)})"
    )


@dataclass(slots=True)
class CallState:
    """One call passing through the gateway (satisfies CallView)."""

    call_id: int
    workflow_id: int
    tenant: str
    step: str
    stage_index: int
    fanout: int
    input_tokens: int
    output_tokens: int
    ready_time_s: float
    deadline_s: float
    workflow_deadline_s: float
    priority: int
    stream: bool = False
    attempts: int = 0
    engine_id: int = -1
    expected_s: float = 0.0
    admit_time_s: float = -1.0  # when the gateway last let it through to its engine (-1: not yet)
    critical_path_at_ready_s: float = 0.0  # its workflow's critical_path_service_s when it arrived (ATLAS)


@dataclass(slots=True)
class WorkflowState:
    """One workflow (satisfies WorkflowView) plus the gateway's bookkeeping."""

    workflow_id: int
    key: str
    tenant: str
    arrival_time_s: float
    slo_s: float
    deadline_s: float
    calls_done: int = 0
    expected_remaining_s: float = 0.0
    attained_service_s: float = 0.0  # seconds from admission to finish, summed over its finished calls
    critical_path_service_s: float = 0.0  # the same along the critical path (see WorkflowView)
    position: int = 0  # pointer into the standard workflow
    inflight: int = 0
    last_seen_s: float = 0.0
    closing: bool = False  # the client said the last stage has been sent
    finished: bool = False

    @property
    def done(self) -> bool:
        return self.finished


class WorkflowLog(Sequence[WorkflowState]):
    """Every arrived workflow in arrival order (= workflow id order), with bounded memory.

    `len()` counts every workflow that ever arrived and index `i` is workflow id `i`, as in the
    simulator's `workflows` list, so a reader that remembers "I have seen the first n" (Knobs-v0's
    observation) keeps working. To keep a long-running gateway's memory bounded, `compact` drops
    the oldest *finished* workflows once they arrived more than `WORKFLOW_RETENTION_S` ago; only
    a prefix is dropped, so indices never shift. Reading a dropped index raises IndexError;
    iteration (forward and `reversed`) yields the retained workflows only.
    """

    __slots__ = ("_items", "_offset")

    def __init__(self) -> None:
        self._items: deque[WorkflowState] = deque()
        self._offset = 0  # workflows compacted away so far

    def append(self, wf: WorkflowState) -> None:
        assert wf.workflow_id == self._offset + len(self._items), "workflow ids must be dense and in order"
        self._items.append(wf)

    def __len__(self) -> int:
        return self._offset + len(self._items)

    @overload
    def __getitem__(self, index: int) -> WorkflowState: ...

    @overload
    def __getitem__(self, index: slice) -> list[WorkflowState]: ...

    def __getitem__(self, index: int | slice) -> WorkflowState | list[WorkflowState]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"workflow index {index} out of range (0..{n - 1})")
        if index < self._offset:
            raise IndexError(f"workflow {index} finished more than {WORKFLOW_RETENTION_S:.0f} s ago and was compacted "
                             f"(the gateway keeps workflows {self._offset}..{n - 1})")
        return self._items[index - self._offset]

    def __iter__(self) -> Iterator[WorkflowState]:
        return iter(self._items)

    def __reversed__(self) -> Iterator[WorkflowState]:
        return reversed(self._items)

    @property
    def first_retained(self) -> int:
        return self._offset

    def compact(self, now_s: float, retention_s: float = WORKFLOW_RETENTION_S) -> int:
        """Drop the finished prefix of workflows that arrived before now - retention; returns how many."""
        items, dropped = self._items, 0
        while items and items[0].finished and items[0].arrival_time_s < now_s - retention_s:
            items.popleft()
            dropped += 1
        self._offset += dropped
        return dropped


class EngineState:
    """One engine (satisfies EngineView): own in-flight accounting merged with scraped /metrics."""

    def __init__(self, engine_id: int, spec: EngineSpec, latency_s: Mapping[str, float]) -> None:
        self.engine_id = engine_id
        self.spec = spec
        self.name = spec.name
        self.gpu = spec.gpu
        self.healthy = True
        self.price_per_hour = spec.price_per_hour
        self.max_num_seqs = spec.batch_limit
        self.inflight_cap = spec.inflight_cap
        self._latency_s = dict(latency_s)
        self._default_latency_s = sum(self._latency_s.values()) / max(1, len(self._latency_s))
        # own accounting
        self.inflight = 0  # calls the gateway has sent and not yet seen finish
        self.queued = 0  # calls held in the gateway's urgency queue for this engine
        self.outstanding_work_s = 0.0
        self.assigned_work_s = 0.0
        self.assigned_calls = 0
        # scraped from the engine's /metrics
        self.scraped_running = 0
        self.scraped_waiting = 0
        self.kv_usage = 0.0
        self.preemptions_total = 0.0
        self.kv_cache_tokens: int | None = None
        self.last_scrape_s: float | None = None
        self.scrape_failures = 0

    @property
    def num_running(self) -> int:
        # the scrape lags by up to one interval; our own count is exact for what we sent
        return max(self.scraped_running, min(self.inflight, self.max_num_seqs)) if self.last_scrape_s else min(self.inflight, self.max_num_seqs)

    @property
    def num_waiting(self) -> int:
        upstream_waiting = max(self.scraped_waiting, self.inflight - self.max_num_seqs, 0)
        return upstream_waiting + self.queued

    def expected_latency_s(self, step: str) -> float:
        return self._latency_s.get(step, self._default_latency_s)

    @property
    def latency_table(self) -> dict[str, float]:
        return dict(self._latency_s)


class ClusterState:
    """The ClusterView of the live cluster.

    `workflows` is every arrived workflow in arrival order (a `WorkflowLog`: finished ones are
    compacted after `WORKFLOW_RETENTION_S`); `open_workflows` maps id -> not yet finished ones.
    """

    def __init__(self, engines: Sequence[EngineState], slo_model: SLOModel, base_latency_s: Mapping[str, float]) -> None:
        self.engines: list[EngineState] = list(engines)
        self.slo = slo_model
        self._base_latency_s = dict(base_latency_s)
        self._t0 = time.monotonic()
        self.workflows = WorkflowLog()
        self.open_workflows: dict[int, WorkflowState] = {}
        self._arrivals: deque[float] = deque()
        self.finished_workflows = 0
        self.met_workflows = 0

    @property
    def now_s(self) -> float:
        return time.monotonic() - self._t0

    def workflow(self, workflow_id: int) -> WorkflowState:
        wf = self.open_workflows.get(workflow_id)
        return wf if wf is not None else self.workflows[workflow_id]

    def add_workflow(self, wf: WorkflowState) -> None:
        self.workflows.append(wf)
        self.open_workflows[wf.workflow_id] = wf

    def base_latency_s(self, step: str) -> float:
        return self._base_latency_s.get(step, self.slo.expected(step))

    def note_arrival(self, now_s: float) -> None:
        self._arrivals.append(now_s)
        self._trim(now_s)

    def _trim(self, now_s: float) -> None:
        while self._arrivals and self._arrivals[0] < now_s - ARRIVAL_RATE_WINDOW_S:
            self._arrivals.popleft()

    @property
    def recent_arrival_rate_qps(self) -> float:
        now = self.now_s
        self._trim(now)
        window = min(ARRIVAL_RATE_WINDOW_S, max(now, 1e-3))
        return len(self._arrivals) / window

    @property
    def slo_attainment_so_far(self) -> float:
        return self.met_workflows / self.finished_workflows if self.finished_workflows else 1.0


def build_cluster_state(cluster: Cluster) -> ClusterState:
    tables = [engine_latency_table(spec, cluster) for spec in cluster.engines]
    engines = [EngineState(i, spec, table) for i, (spec, table) in enumerate(zip(cluster.engines, tables))]
    by_type: dict[str, dict[str, float]] = {}
    for spec, table in zip(cluster.engines, tables):
        by_type.setdefault(spec.gpu, table)
    slo_model = SLOModel.from_engine_latencies(list(by_type.values()))
    # the reference (base) engine type: the slowest type, the one the SLO must be feasible on
    base = max(by_type.values(), key=lambda t: sum(t.values()))
    return ClusterState(engines, slo_model, base)


__all__ = [
    "CallState", "WorkflowState", "WorkflowLog", "EngineState", "ClusterState", "build_cluster_state",
    "engine_latency_table", "stage_tokens", "normalise_step",
]
