"""Live cluster state as the read-only view policies see (envs/sim/view.py), kept by the gateway.

The classes here have exactly the attributes of `CallView`, `EngineView`, `WorkflowView` and
`ClusterView`. What does not change while an engine runs is the simulator's own `EngineModel`
(`envs.sim.model`), built from the same engine description; the load accounting, the SLO model and
the arrival window are the simulator's classes too, fed here by live events (a call queued, sent,
finished; a scrape of /metrics). The gateway mutates them; policies only read them. Times are seconds on the gateway's monotonic
clock (`time.monotonic() - start`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, overload

from deploy.cluster import Cluster, EngineSpec
from deploy.gateway.kv_events import KVEventIndex
from deploy.gateway.prefix_index import EnginePrefixIndex, Segments
from envs.sim.catalog import load_catalog
from envs.sim.errors import UserError
from envs.sim.model import (
    ArrivalWindow,
    EngineModel,
    LedgerMixin,
    StepTokens,
    WorkLedger,
    cluster_slo_model,
    reference_latency_table,
)
from envs.sim.model import build_engine_model as sim_build_engine_model
from envs.sim.slo import REFERENCE_PATH, SLOModel
from envs.sim.workload import normalise_step


def reference_gpu_types() -> list[str]:
    with open(REFERENCE_PATH) as handle:
        return list(json.load(handle)["latency_s"])

# Finished workflows stay in `ClusterState.workflows` at least this long after arrival (knob
# policies look back 300 s for burstiness), then the finished prefix is compacted away.
WORKFLOW_RETENTION_S = 900.0
# KV capacity of an engine known only by its GPU type, until its /metrics tells (every call fits)
UNKNOWN_KV_CAPACITY_TOKENS = 2**31 - 1


def build_engine_model(spec: EngineSpec, cluster: Cluster, step_tokens: StepTokens) -> EngineModel:
    """The engine model of one engine of the cluster file, built with the simulator's function from
    the simulator's description of the engine (`EngineSpec.engine_config`).

    Expected latencies, first that applies: the engine's explicit `latency_s`; its calibrated
    `profile` (or the roofline of its catalog `gpu` and `architecture`) at the standard step sizes
    times the gateway's token scale; the paper's measured table of its `gpu` type (real GPUs,
    unscaled tokens). KV capacity: the profile's or the roofline's, else unknown until scraped.
    """
    config = spec.engine_config(cluster.path(spec.profile) if spec.profile else None)
    catalog = load_catalog()
    modelled = bool(config.profile) or (spec.architecture is not None)
    table = dict(spec.latency_s) if spec.latency_s else None
    if table is None and not modelled:
        table = reference_latency_table(spec.gpu)
        if table is None:
            raise UserError(
                f"engine {spec.name!r}: no latency source (add `profile:` written by `agentsched calibrate`, "
                f"`architecture:` with a catalog gpu, `latency_s:` per step, or a gpu type among "
                f"{sorted(reference_gpu_types())})")
    return sim_build_engine_model(config, step_tokens, catalog, latency_table=table,
                                  kv_capacity_tokens=None if modelled else UNKNOWN_KV_CAPACITY_TOKENS)


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
    # the prompt's block hash chain (deploy/gateway/prefix_index.py); () when unknown: no cache estimate
    segments: Segments = ()
    token_chain: bool = False  # the segments are the block chain of a token-id prompt (KV events can match them)
    predicted_hit_tokens: int = 0  # prompt tokens the prefix index predicted its engine to serve from cache
    admit_time_s: float = -1.0  # when the gateway last let it through to its engine (-1: not yet)
    critical_path_at_ready_s: float = 0.0  # its workflow's critical_path_service_s when it arrived (ATLAS)
    background: bool = False  # sent as background work (its workflow was deferred when it was let through)


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
    # the stage in progress (calls with the same X-Stage-Index are one fan-out stage, as in the
    # simulator: one standard position and one deadline for all of them)
    stage_index: int = -1
    stage_position: int = 0
    stage_deadline_s: float = 0.0
    inflight: int = 0
    last_seen_s: float = 0.0
    closing: bool = False  # the client said the last stage has been sent
    finished: bool = False
    deferred: bool = False  # the policy's admission said "defer" (`Policy.admit`): its calls are background work

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


class EngineState(LedgerMixin):
    """One engine (satisfies EngineView): its `EngineModel` (the simulator's), the gateway's own
    in-flight accounting, and what the engine's /metrics said."""

    def __init__(self, engine_id: int, spec: EngineSpec, model: EngineModel) -> None:
        self.engine_id = engine_id
        self.spec = spec
        self.model = model
        self.name = model.name
        self.gpu = model.gpu
        self.healthy = True
        self.price_per_hour = model.price_per_hour
        self.max_num_seqs = model.max_num_seqs
        self.inflight_cap = spec.inflight_cap
        self.expected_latency_s = model.expected_latency_s  # EngineView
        self.ledger = WorkLedger()
        # own accounting
        self.inflight = 0  # calls the gateway has sent and not yet seen finish
        self.queued = 0  # calls held in the gateway's urgency queue for this engine
        self.foreground_inflight = 0  # of the in-flight calls, those of workflows not deferred
        # scraped from the engine's /metrics
        self.scraped_running = 0
        self.scraped_waiting = 0
        self.kv_usage = 0.0
        self.preemptions_total = 0.0
        self.scraped_kv_capacity_tokens: int | None = None
        self.last_scrape_s: float | None = None
        self.scrape_failures = 0
        # the engine's own prefix-cache counters (tokens; vllm:prefix_cache_queries/hits), None until scraped
        self.prefix_cache_queries_total: float | None = None
        self.prefix_cache_hits_total: float | None = None
        # what the gateway predicts the engine's prefix cache holds, from the prompts it sent there
        self.prefix_index = EnginePrefixIndex(model.block_size_tokens, model.kv_capacity_tokens)
        # what the engine itself reports cached, when it publishes KV-cache events (None: it does not)
        self.kv_events = KVEventIndex(model.block_size_tokens) if spec.kv_events_endpoint else None
        # the last lookup: (call id, index version, event batches, hit tokens). A call's dispatch
        # and enqueue ask for the same engine's hits in one event-loop step; a long prompt's chain
        # is walked once
        self._last_lookup: tuple[int, int, int, int] = (-1, -1, -1, 0)

    @property
    def kv_capacity_tokens(self) -> int:
        """The engine's own figure once scraped (vLLM's cache_config_info), else the model's."""
        scraped = self.scraped_kv_capacity_tokens
        return scraped if scraped is not None else self.model.kv_capacity_tokens

    @property
    def num_running(self) -> int:
        """Calls in the engine's batch. The gateway knows exactly how many calls are at the engine
        (`inflight`); the split into batch and queue is the engine's, from its last scrape: calls
        sent since then count as waiting until a scrape shows them running (as the simulator counts
        calls still in the API server). Before any scrape, vLLM's rule: up to max_num_seqs run."""
        if self.last_scrape_s is None:
            return min(self.inflight, self.max_num_seqs)
        return min(self.inflight, self.scraped_running)

    @property
    def num_waiting(self) -> int:
        """Calls sent here and not yet in the batch, plus the gateway's own queue for the engine."""
        upstream_waiting = self.inflight - self.num_running
        if self.last_scrape_s is not None and self.scraped_waiting > upstream_waiting:
            upstream_waiting = self.scraped_waiting  # the engine queues more than we sent (other clients)
        return upstream_waiting + self.queued

    # prefix cache: the gateway's prediction (`prefix_index`), read exactly as the simulator reads
    # its engine's cache; the latency given hits is the engine model's formula
    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens of prompt prefixes the engine holds in its cache (as its KV events report them,
        else as the gateway predicts them)."""
        events = self.kv_events
        if events is not None and events.live:
            return events.cached_tokens
        return self.prefix_index.cached_tokens

    def cached_prefix_tokens(self, call: CallState) -> int:
        """Prompt tokens of `call` the engine would serve from its cache if sent now: from its KV
        events for a token-id prompt when it publishes them, else the gateway's prediction."""
        if not call.segments:
            return 0
        events = self.kv_events
        heard = events.batches if events is not None and call.token_chain else 0
        call_id, version, batches, hit = self._last_lookup
        if call_id == call.call_id and version == self.prefix_index.version and batches == heard:
            return hit
        if events is not None and heard:
            hit = events.hit_tokens(call.segments, call.input_tokens)
        else:
            hit = self.prefix_index.hit_tokens(call.segments, call.input_tokens)
        self._last_lookup = (call.call_id, self.prefix_index.version, heard, hit)
        return hit

    def expected_call_latency_s(self, call: CallState) -> float:
        hit = self.cached_prefix_tokens(call)
        if hit == 0:
            return self.expected_latency_s(call.step)
        return self.model.expected_latency_with_hits_s(call.step, call.input_tokens, hit)

    @property
    def latency_table(self) -> dict[str, float]:
        return self.model.latency_by_step(self.model.step_tokens.steps())


class ClusterState:
    """The ClusterView of the live cluster.

    `workflows` is every arrived workflow in arrival order (a `WorkflowLog`: finished ones are
    compacted after `WORKFLOW_RETENTION_S`); `open_workflows` maps id -> not yet finished ones.
    """

    def __init__(self, engines: Sequence[EngineState], slo_model: SLOModel,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engines: list[EngineState] = list(engines)
        self.slo = slo_model
        self._clock = clock
        self._t0 = clock()
        self.workflows = WorkflowLog()
        self.open_workflows: dict[int, WorkflowState] = {}
        self._arrivals = ArrivalWindow()
        self.finished_workflows = 0
        self.met_workflows = 0

    @property
    def now_s(self) -> float:
        return self._clock() - self._t0

    def workflow(self, workflow_id: int) -> WorkflowState:
        wf = self.open_workflows.get(workflow_id)
        return wf if wf is not None else self.workflows[workflow_id]

    def add_workflow(self, wf: WorkflowState) -> None:
        self.workflows.append(wf)
        self.open_workflows[wf.workflow_id] = wf

    def note_arrival(self, now_s: float) -> None:
        self._arrivals.note(now_s)

    @property
    def recent_arrival_rate_qps(self) -> float:
        return self._arrivals.rate_qps(self.now_s)

    @property
    def slo_attainment_so_far(self) -> float:
        return self.met_workflows / self.finished_workflows if self.finished_workflows else 1.0


def build_cluster_state(cluster: Cluster, clock: Callable[[], float] = time.monotonic) -> ClusterState:
    """The live view of a cluster file: the simulator's engine models and SLO model of its engines,
    with the standard CHESS step sizes scaled by the gateway's `token_scale`."""
    step_tokens = StepTokens.from_reference(cluster.gateway.token_scale)
    models = [build_engine_model(spec, cluster, step_tokens) for spec in cluster.engines]
    engines = [EngineState(i, spec, model) for i, (spec, model) in enumerate(zip(cluster.engines, models))]
    return ClusterState(engines, cluster_slo_model(models, step_tokens.steps()), clock)


__all__ = [
    "CallState", "WorkflowState", "WorkflowLog", "EngineState", "ClusterState", "build_cluster_state",
    "build_engine_model", "normalise_step",
]
