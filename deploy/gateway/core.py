"""The gateway's engine room: dispatch, per-engine urgency queues, health, scraping, retries.

Flow of one call: the HTTP layer builds a `CallState` (`new_call`), then `submit` asks the policy
for an engine (`policy.dispatch(call, cluster)`), queues the call in that engine's heap ordered by
`policy.queue_key(call, engine)`, and waits until the engine has an in-flight slot. Only then is
the call sent to vLLM, so the policy's local ordering decides which waiting call the engine gets
next (vLLM itself serves what it receives FCFS). A failed attempt (connection error, 5xx, engine
marked down while queued) goes back to `dispatch` with the failed engine excluded.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import json
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from deploy.cluster import Cluster
from deploy.gateway.kv_events import follow_kv_events
from deploy.gateway.prefix_index import Segments
from deploy.gateway.state import (
    WORKFLOW_RETENTION_S,
    CallState,
    ClusterState,
    EngineState,
    WorkflowState,
    build_cluster_state,
)
from deploy.upstream import Upstream, UpstreamError
from deploy.vllm_metrics import (
    PREFIX_CACHE_SAMPLE_PREFIXES,
    add_prefix_cache_sample,
    counters_from_samples,
)
from envs.sim.cluster import DEFERRED_OFFSET_S, ClusterSimulator
from envs.sim.config import EngineConfig
from envs.sim.errors import UserError
from envs.sim.fork import simulator_from_view, token_scaled
from envs.sim.model import EngineModel
from envs.sim.workload import TraceGenerator, load_trace
from policies.base import IntervalDecision, Policy

log = logging.getLogger("agentsched.gateway")

# vLLM metric sample names the scraper keeps (everything else on /metrics is skipped before parsing)
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
VLLM_PREEMPTIONS = "vllm:num_preemptions_total"
VLLM_CACHE_INFO = "vllm:cache_config_info"
# the engine's prefix-cache counters, in prompt tokens (queried, served from cache): the current V1
# names first, then the older ones (`gpu_` prefix, earlier V1 releases); each with and without the
# `_total` suffix prometheus_client's exposition adds to a counter
_SCRAPED_PREFIXES = (VLLM_RUNNING + "{", VLLM_WAITING + "{", VLLM_KV_USAGE, "vllm:num_preemptions", VLLM_CACHE_INFO) + PREFIX_CACHE_SAMPLE_PREFIXES
DECISION_BUCKETS_S = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 1e-2)


class QueueFull(Exception):
    """Every healthy engine's queue is at its bound; the client gets 429 + Retry-After."""


class WorkflowFinished(Exception):
    """A call names the X-Workflow-Id of a workflow that already finished; the client gets 409."""


class NoEngine(Exception):
    """No healthy engine for longer than `no_engine_wait_s`; the client gets 503."""


class ShuttingDown(Exception):
    """The gateway is stopping (SIGTERM/SIGINT): queued and new calls get 503 at once."""


FINISHED_KEY_MEMORY_S = WORKFLOW_RETENTION_S  # a finished workflow's id is refused this long after it finished
STOP_TASKS_TIMEOUT_S = 2.0  # background loops get this long to end after cancellation
SLOW_CALLBACK_S = 0.02  # policy hooks slower than this are logged (they block the event loop)
# the digital twin (planners with `plans_on_twin`): its workload model is this trace's fitted
# generator at the gateway's token_scale, and it holds enough future arrivals at the recent rate
# to cover this long (a planner's rollouts stop at their own horizon)
TWIN_TRACE = "chess_trace1"
TWIN_ARRIVALS_S = 300.0
TWIN_MAX_FUTURE_QUERIES = 200
TWIN_DECISIONS_KEPT = 100  # recent twin decisions shown by /v1/agentsched/info


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    name: str
    healthy: bool
    model: EngineModel


@dataclass(frozen=True)
class LiveSnapshot:
    """What the digital twin is built from (`envs.sim.fork.ModelledClusterView`), copied on the
    event loop: the worker thread that builds the twin and plans on it reads nothing the loop
    mutates meanwhile."""

    now_s: float
    recent_arrival_rate_qps: float
    engines: tuple[EngineSnapshot, ...]
    calls: tuple[CallState, ...]  # copies of the calls in flight of open workflows
    workflows: dict[int, WorkflowState]  # copies of their workflows

    def workflow(self, workflow_id: int) -> WorkflowState:
        return self.workflows[workflow_id]


@dataclass(order=True)
class _Pending:
    key: float
    seq: int
    call: CallState = field(compare=False)
    admitted: asyncio.Future = field(compare=False)


PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS = "prefix_cache_queries", "prefix_cache_hits"  # keys of the scrape
_SUMMED = (VLLM_RUNNING, VLLM_WAITING, VLLM_PREEMPTIONS)  # counts: summed over an engine's label sets


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """Pick the engine-state samples out of a vLLM /metrics page.

    The page is about 50 KB, mostly histograms we do not use, so sample lines are filtered by
    prefix first and only the few kept are parsed, with prometheus_client's text parser. Request
    counts and preemptions are summed over label sets (one vLLM server may run several engine
    cores, labelled `engine="0"`, `"1"`, ...); KV usage is a share per engine core, so the
    fullest core's is taken (a call can land on it), never a sum.
    """
    kept = "\n".join(line for line in text.splitlines() if line.startswith(_SCRAPED_PREFIXES)) + "\n"
    out: dict[str, float] = {}
    kv_by_core: dict[str, float] = {}
    prefix: dict[str, float] = {}  # counter sample name -> value summed over engine cores
    for family in text_string_to_metric_families(kept):
        for sample in family.samples:
            if sample.name.startswith(PREFIX_CACHE_SAMPLE_PREFIXES):
                add_prefix_cache_sample(prefix, sample.name, sample.value)
            elif sample.name == VLLM_CACHE_INFO:
                tokens = sample.labels.get("kv_cache_size_tokens")
                if tokens is not None:
                    out["kv_cache_size_tokens"] = out.get("kv_cache_size_tokens", 0.0) + float(tokens)
            elif sample.name == VLLM_KV_USAGE:
                core = sample.labels.get("engine", "")
                kv_by_core[core] = max(kv_by_core.get(core, 0.0), sample.value)
            elif sample.name in _SUMMED:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    if kv_by_core:
        out[VLLM_KV_USAGE] = max(kv_by_core.values())
    counters = counters_from_samples(prefix)
    if counters is not None:
        out[PREFIX_CACHE_QUERIES], out[PREFIX_CACHE_HITS] = counters.queries_tokens, counters.hits_tokens
    return out


class GatewayMetrics:
    """The gateway's own Prometheus metrics (its /metrics endpoint)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed = Counter("agentsched_routed_calls", "Calls sent to each engine", ["engine"], registry=r)
        self.retries = Counter("agentsched_retried_calls", "Attempts that failed and were re-dispatched", ["engine"], registry=r)
        self.rejected = Counter("agentsched_rejected_calls", "Calls refused", ["reason"], registry=r)
        self.deferred = Counter("agentsched_deferred_workflows", "Workflows the policy's admission deferred", registry=r)
        self.answered = Counter("agentsched_answered_calls", "Calls answered with a complete 2xx answer", ["engine"],
                                registry=r)
        self.queue_len = Gauge("agentsched_queue_length", "Calls held in the gateway queue per engine", ["engine"], registry=r)
        self.inflight = Gauge("agentsched_inflight", "Calls in flight at each engine", ["engine"], registry=r)
        self.healthy = Gauge("agentsched_engine_healthy", "1 if the engine is up", ["engine"], registry=r)
        self.kv_usage = Gauge("agentsched_engine_kv_usage", "Scraped KV-cache usage 0..1", ["engine"], registry=r)
        self.engine_prefix_queries = Gauge(
            "agentsched_engine_prefix_cache_queries_tokens",
            "The engine's own vllm:prefix_cache_queries (prompt tokens looked up since it started), as last scraped",
            ["engine"], registry=r)
        self.engine_prefix_hits = Gauge(
            "agentsched_engine_prefix_cache_hits_tokens",
            "The engine's own vllm:prefix_cache_hits (prompt tokens served from its cache since it started), as last scraped",
            ["engine"], registry=r)
        self.predicted_queries = Counter("agentsched_prefix_index_query_tokens",
                                         "Prompt tokens of calls sent to each engine with a known prompt structure",
                                         ["engine"], registry=r)
        self.predicted_hits = Counter("agentsched_prefix_index_predicted_hit_tokens",
                                      "Prompt tokens the gateway's prefix index predicted each engine to serve from cache",
                                      ["engine"], registry=r)
        self.index_cached = Gauge("agentsched_prefix_index_cached_tokens",
                                  "Prompt-prefix tokens the gateway's index predicts each engine holds", ["engine"],
                                  registry=r)
        self.decision = Histogram("agentsched_decision_seconds", "Time of one policy dispatch decision",
                                  buckets=DECISION_BUCKETS_S, registry=r)
        self.wf_finished = Counter("agentsched_workflows_finished", "Finished workflows", ["tenant"], registry=r)
        self.wf_met = Counter("agentsched_workflows_met_slo", "Workflows finished within their SLO", ["tenant"], registry=r)
        self.slo_attainment = Gauge("agentsched_slo_attainment", "Share of finished workflows within SLO", ["tenant"], registry=r)
        # planners on the digital twin (Policy.plans_on_twin)
        self.twin_decisions = Counter("agentsched_twin_decisions", "Control-interval decisions planned on the digital twin",
                                      ["changed"], registry=r)
        self.twin_decision_s = Gauge("agentsched_twin_decision_seconds",
                                     "Wall time of the last twin decision (twin build + planning)", registry=r)
        self.twin_goodput = Gauge("agentsched_twin_predicted_goodput_qps",
                                  "Predicted SLO-goodput over the planning horizon of the last decision, per setting",
                                  ["setting"], registry=r)
        self.policy_knob = Gauge("agentsched_policy_knob", "Knob values in force after the last twin decision", ["knob"],
                                 registry=r)


class Gateway:
    """Owns the live state, the policy, the upstream pools and the background loops."""

    def __init__(self, cluster: Cluster, policy: Policy) -> None:
        self.cluster = cluster
        self.config = cluster.gateway
        self.policy = policy
        self.state: ClusterState = build_cluster_state(cluster)
        self.pools = [Upstream(spec.base_url, timeout_s=self.config.upstream_timeout_s) for spec in cluster.engines]
        self.queues: list[list[_Pending]] = [[] for _ in cluster.engines]
        self.metrics = GatewayMetrics()
        self._seq = itertools.count()
        self._call_ids = itertools.count()
        self._workflow_ids = itertools.count()
        self._workflow_keys: dict[str, int] = {}
        # X-Workflow-Id of finished workflows -> finish time, oldest first; remembered for
        # FINISHED_KEY_MEMORY_S so a reused id is refused (409) rather than silently reopened
        self._finished_keys: OrderedDict[str, float] = OrderedDict()
        # workflow id -> calls that failed (429, 502, broken stream) and not yet sent again: such a
        # workflow does not finish on its last call, since the client is expected to retry it
        self._retry_pending: dict[int, int] = {}
        self._health_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.shutting_down = False
        self.interval_calls = 0
        self._tenant_counts: dict[str, list[int]] = {}
        # prompts are cut into segments at the smallest block size of the cluster (prefix_index.py),
        # or at the configured multiple of it
        smallest_block = min(e.model.block_size_tokens for e in self.state.engines)
        segment = self.config.prefix_segment_tokens
        if segment is not None and segment % smallest_block:
            raise UserError(f"gateway.prefix_segment_tokens={segment} must be a multiple of the engines' smallest "
                            f"block_size_tokens ({smallest_block}); use e.g. {smallest_block * max(1, segment // smallest_block)}")
        self.prefix_segment_tokens = segment or smallest_block
        for e in self.state.engines:
            if e.kv_events is not None and e.kv_events.block_tokens != self.prefix_segment_tokens:
                raise UserError(f"engine {e.name!r}: kv_events_endpoint needs prompt chains cut at its block size "
                                f"({e.kv_events.block_tokens} tokens), but the gateway cuts {self.prefix_segment_tokens}; "
                                "leave gateway.prefix_segment_tokens unset and give every engine the same block_size_tokens")
        self.prefix_index_enabled = self.config.prefix_index
        for e in self.state.engines:
            self.metrics.healthy.labels(e.name).set(1)
        # calls placed on an engine (queued here or sent) and not yet released: the twin's calls in flight
        self.calls_in_flight: dict[int, CallState] = {}
        self.twin_decisions: deque[dict[str, Any]] = deque(maxlen=TWIN_DECISIONS_KEPT)
        self._twin_inputs: tuple[TraceGenerator, list[EngineConfig]] | None = None
        if policy.plans_on_twin:  # its mistakes (an engine the simulator cannot run) show at start-up
            self._twin_inputs = self._prepare_twin()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.policy.reset()
        self.shutting_down = False
        self._tasks = [asyncio.create_task(self._scrape_loop(i), name=f"scrape-{e.name}")
                       for i, e in enumerate(self.state.engines)]
        self._tasks.append(asyncio.create_task(self._control_loop(), name="control"))
        self._tasks.append(asyncio.create_task(self._gc_loop(), name="workflow-gc"))
        for e in self.state.engines:
            if e.kv_events is not None and e.spec.kv_events_endpoint:
                self._tasks.append(asyncio.create_task(follow_kv_events(e.spec.kv_events_endpoint, e.kv_events),
                                                       name=f"kv-events-{e.name}"))

    @property
    def control_interval_s(self) -> float:
        """Period of `policy.on_interval`: the policy's own `interval_s` when it has one (as in the
        simulator, `ClusterSimulator(policy=...)`), else the cluster's `control_interval_s`."""
        interval = self.policy.interval_s
        return float(interval) if interval else self.config.control_interval_s

    def begin_shutdown(self) -> int:
        """Refuse new calls and fail every queued or engine-waiting call with ShuttingDown (503).

        Calls already sent upstream keep running (the server gives them a grace period). Returns
        the number of queued calls failed. Idempotent."""
        self.shutting_down = True
        failed = 0
        for engine in self.state.engines:
            queue = self.queues[engine.engine_id]
            while queue:
                pending = heapq.heappop(queue)
                engine.queued -= 1
                if not pending.admitted.done():
                    pending.admitted.set_exception(ShuttingDown())
                    failed += 1
        self._health_event.set()  # wake calls waiting for a healthy engine; they see shutting_down
        if failed:
            log.warning("shutting down: %d queued calls answered 503", failed)
        return failed

    async def stop(self) -> None:
        """Stop the scrape/health, control and gc loops and close every upstream connection."""
        self.begin_shutdown()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_TASKS_TIMEOUT_S)
            for task in pending:  # should not happen; never let a stuck loop hold the process
                log.error("background task %s did not stop within %.0f s", task.get_name(), STOP_TASKS_TIMEOUT_S)
        self._tasks = []
        for pool in self.pools:
            await pool.close()

    # ------------------------------------------------------------------ the digital twin
    def _prepare_twin(self) -> tuple[TraceGenerator, list[EngineConfig]]:
        """The twin's workload model (TWIN_TRACE at the gateway's token_scale) and engine configs;
        refuses, in one line, a cluster whose engines the simulator cannot run (a latency table only)."""
        for e in self.state.engines:
            if e.model.perf is None:
                raise UserError(f"engine {e.name!r}: policy {self.policy.name} plans on the gateway's digital twin, "
                                f"which needs an iteration model (give the engine `profile:` or `architecture:`)")
        specs = token_scaled(load_trace(TWIN_TRACE), self.config.token_scale)
        generator = TraceGenerator.fit(specs, name=f"twin({TWIN_TRACE} x{self.config.token_scale:g})")
        return generator, self.cluster.engine_configs()

    def snapshot(self) -> LiveSnapshot:
        """Copy what the twin needs of the live state (on the event loop; about a millisecond)."""
        st = self.state
        open_wfs = st.open_workflows
        calls = tuple(copy.copy(c) for c in self.calls_in_flight.values() if c.workflow_id in open_wfs)
        return LiveSnapshot(st.now_s, st.recent_arrival_rate_qps,
                            tuple(EngineSnapshot(e.name, e.healthy, e.model) for e in st.engines), calls,
                            {c.workflow_id: copy.copy(open_wfs[c.workflow_id]) for c in calls})

    def build_twin(self, seed: int, snapshot: LiveSnapshot | None = None) -> ClusterSimulator:
        """A simulator in the live state (`envs.sim.fork.simulator_from_view` of `snapshot`,
        default: one taken now): the calls in flight on their engines, unknown lengths and the rest
        of each workflow drawn with `seed`, future arrivals at the recent rate. Reads only the
        snapshot, so it may run in a worker thread while the live state moves on."""
        if self._twin_inputs is None:
            self._twin_inputs = self._prepare_twin()
        generator, engine_configs = self._twin_inputs
        view = snapshot if snapshot is not None else self.snapshot()
        future = min(TWIN_MAX_FUTURE_QUERIES, math.ceil(view.recent_arrival_rate_qps * TWIN_ARRIVALS_S) + 2)
        # the twin carries the live policy: forks of it order queues and tick as the candidates do
        return simulator_from_view(view, view.calls, engine_configs, self.config.slo_scale, seed,
                                   generator, future_queries=future, policy=self.policy,
                                   prefix_cache=False, slo=self.state.slo)

    def _plan_on_snapshot(self, snapshot: LiveSnapshot, seed: int) -> tuple[IntervalDecision | None, float]:
        """Build the twin and plan on it (in the worker thread); returns the decision and the build time."""
        t0 = time.perf_counter()
        twin = self.build_twin(seed, snapshot)
        built_s = time.perf_counter() - t0
        return self.policy.plan_interval(twin), built_s

    async def _plan_on_twin(self, tick: int) -> IntervalDecision | None:
        """One control interval of a `plans_on_twin` policy: snapshot the live state (event loop),
        build the twin from it and plan on it in a worker thread, adopt the decision back on the
        event loop; log it (one JSON line) and export it on /metrics."""
        t0 = time.perf_counter()
        snapshot = self.snapshot()
        snapshot_s = time.perf_counter() - t0
        decision, built_s = await asyncio.to_thread(self._plan_on_snapshot, snapshot, tick)
        if decision is None:
            return None
        self.policy.adopt_plan(decision)
        total_s = time.perf_counter() - t0
        record = {
            "event": "twin_decision", "tick": tick, "time_s": round(decision.time_s, 3), "changed": decision.changed,
            "knobs": decision.knobs, "current_knobs": decision.current_knobs,
            "predicted_goodput_qps": round(decision.predicted_goodput_qps, 6),
            "current_goodput_qps": round(decision.current_goodput_qps, 6),
            "predicted_gain": round(decision.predicted_gain, 6), "horizon_s": decision.horizon_s,
            "plan_s": round(decision.decision_s, 4), "twin_build_s": round(built_s, 4),
            "snapshot_s": round(snapshot_s, 5), "decision_s": round(total_s, 4), "calls_in_flight": len(snapshot.calls), "open_workflows": len(self.state.open_workflows),
            "recent_arrival_rate_qps": round(self.state.recent_arrival_rate_qps, 4),
        }
        self.twin_decisions.append(record)
        log.info("twin decision %s", json.dumps(record))
        m = self.metrics
        m.twin_decisions.labels(str(decision.changed).lower()).inc()
        m.twin_decision_s.set(total_s)
        m.twin_goodput.labels("chosen").set(decision.predicted_goodput_qps)
        m.twin_goodput.labels("current").set(decision.current_goodput_qps)
        for knob, value in decision.knobs.items():
            m.policy_knob.labels(knob).set(value)
        return decision

    # ------------------------------------------------------------------ workflows and calls
    def _workflow(self, key: str | None, tenant: str, slo_s: float | None, now: float) -> WorkflowState:
        st = self.state
        if key is not None and key in self._workflow_keys:
            wf = st.open_workflows.get(self._workflow_keys[key])
            if wf is not None:
                return wf
        if key is not None and key in self._finished_keys:
            raise WorkflowFinished(key)
        wid = next(self._workflow_ids)
        slo = slo_s if slo_s and slo_s > 0 else self.config.slo_scale * st.slo.base_slo_s
        wf = WorkflowState(wid, key or f"single-{wid}", tenant, now, slo, now + slo,
                           expected_remaining_s=st.slo.base_slo_s, last_seen_s=now)
        st.add_workflow(wf)
        if key is not None:
            self._workflow_keys[key] = wid
        st.note_arrival(now)
        return wf

    def new_call(self, *, workflow_key: str | None, step: str, tenant: str, input_tokens: int, output_tokens: int,
                 stream: bool, slo_s: float | None = None, stage_index: int | None = None, fanout: int = 1,
                 priority: int = 0, last: bool = False, segments: Segments = (), token_chain: bool = False) -> CallState:
        """Register a call (and its workflow on first sight); compute its deadline the simulator's way.
        `segments`: the prompt's block hash chain (`prefix_index.prompt_segments`), () if unknown;
        `token_chain`: it is the chain of a token-id prompt."""
        st = self.state
        now = st.now_s
        wf = self._workflow(workflow_key, tenant, slo_s, now)
        if stage_index is not None and stage_index == wf.stage_index:
            position, deadline = wf.stage_position, wf.stage_deadline_s  # a sibling of a fan-out stage
        else:
            position = st.slo.position(step, wf.position)
            wf.position = position + 1
            wf.expected_remaining_s = st.slo.remaining_after(position)
            deadline = st.slo.call_deadline_s(now, wf.deadline_s, step, position)
            wf.stage_index = stage_index if stage_index is not None else -1
            wf.stage_position, wf.stage_deadline_s = position, deadline
        wf.last_seen_s = now
        wf.inflight += 1
        pending = self._retry_pending.get(wf.workflow_id)
        if pending:  # a call of a workflow with a failed call: take it as that call's retry
            self._retry_pending[wf.workflow_id] = pending - 1
        wf.closing = wf.closing or last or workflow_key is None
        return CallState(
            call_id=next(self._call_ids), workflow_id=wf.workflow_id, tenant=tenant, step=step,
            stage_index=stage_index if stage_index is not None else position, fanout=fanout,
            input_tokens=input_tokens, output_tokens=output_tokens, ready_time_s=now, deadline_s=deadline,
            workflow_deadline_s=wf.deadline_s, priority=priority, stream=stream, segments=segments,
            token_chain=token_chain,
            critical_path_at_ready_s=wf.critical_path_service_s,
        )

    def call_finished(self, call: CallState, ok: bool) -> None:
        st = self.state
        wf = st.open_workflows.get(call.workflow_id)
        if wf is None:
            return
        wf.inflight -= 1
        if ok:
            wf.calls_done += 1
            service_s = st.now_s - call.admit_time_s if call.admit_time_s >= 0.0 else 0.0
            wf.attained_service_s += service_s
            wf.critical_path_service_s = max(wf.critical_path_service_s, call.critical_path_at_ready_s + service_s)
        elif wf.key in self._workflow_keys:  # a client-named workflow: the client may send the call again
            self._retry_pending[wf.workflow_id] = self._retry_pending.get(wf.workflow_id, 0) + 1
        if wf.closing and wf.inflight == 0 and not wf.finished and not self._retry_pending.get(wf.workflow_id):
            self._finish_workflow(wf, st.now_s)

    def _finish_workflow(self, wf: WorkflowState, now: float) -> None:
        wf.finished = True
        met = now <= wf.deadline_s
        st = self.state
        st.finished_workflows += 1
        st.met_workflows += int(met)
        counts = self._tenant_counts.setdefault(wf.tenant, [0, 0])
        counts[0] += 1
        counts[1] += int(met)
        self.metrics.wf_finished.labels(wf.tenant).inc()
        if met:
            self.metrics.wf_met.labels(wf.tenant).inc()
        self.metrics.slo_attainment.labels(wf.tenant).set(counts[1] / counts[0])
        st.open_workflows.pop(wf.workflow_id, None)
        self._retry_pending.pop(wf.workflow_id, None)
        if self._workflow_keys.pop(wf.key, None) is not None:
            self._finished_keys[wf.key] = now
            self._finished_keys.move_to_end(wf.key)

    def _forget_finished_keys(self, now: float) -> None:
        keys = self._finished_keys
        while keys:
            key, finished_s = next(iter(keys.items()))
            if now - finished_s <= FINISHED_KEY_MEMORY_S:
                break
            keys.popitem(last=False)

    # ------------------------------------------------------------------ dispatch and queues
    def _dispatch(self, call: CallState) -> int:
        t0 = time.perf_counter()
        try:
            return self.policy.dispatch(call, self.state)
        finally:
            self.metrics.decision.observe(time.perf_counter() - t0)

    def _choose(self, call: CallState, exclude: set[int]) -> EngineState | None:
        """The engine for `call`: the policy's choice if that engine is up, not excluded (failed
        this call already) and has room in its queue; else the policy's next choice among the
        engines that qualify. Raises QueueFull only when every healthy engine's queue is full
        (shedding is decided by the cluster, not by one engine); None when no engine is healthy.

        The next choice is asked of the same policy on the same view with the engines that do not
        qualify shown as down for that one decision (policies already route around down engines);
        if it still picks one of them, the qualifying engine with the least outstanding work."""
        engines = self.state.engines
        healthy = [e for e in engines if e.healthy]
        if not healthy:
            return None
        bound = self.config.max_queue_per_engine
        # engines that already failed this call are the last resort, before a 429
        with_room = ([e for e in healthy if e.engine_id not in exclude and e.queued < bound]
                     or [e for e in healthy if e.queued < bound])
        if not with_room:
            raise QueueFull(", ".join(e.name for e in healthy))
        idx = self._dispatch(call)
        chosen = engines[idx] if 0 <= idx < len(engines) else None
        if chosen in with_room:
            return chosen
        masked = [e for e in healthy if e not in with_room]
        for e in masked:
            e.healthy = False
        try:
            idx = self._dispatch(call)
        except Exception:  # noqa: BLE001 - a policy that cannot decide on the masked view
            idx = -1
        finally:
            for e in masked:
                e.healthy = True
        chosen = engines[idx] if 0 <= idx < len(engines) else None
        if chosen in with_room:
            return chosen
        return min(with_room, key=lambda e: (e.outstanding_work_s, e.inflight + e.queued))

    def _pump(self, engine: EngineState) -> None:
        """Admit queued calls, most urgent first, while the engine has in-flight room."""
        queue = self.queues[engine.engine_id]
        while queue and engine.inflight < engine.inflight_cap and engine.healthy:
            if queue[0].key >= DEFERRED_OFFSET_S and engine.foreground_inflight:
                break  # background work (a deferred workflow's call) waits for an engine free of other work
            pending = heapq.heappop(queue)
            engine.queued -= 1
            if pending.admitted.done():  # client went away
                continue
            engine.inflight += 1
            call = pending.call
            call.background = pending.key >= DEFERRED_OFFSET_S
            if not call.background:
                engine.foreground_inflight += 1
            call.admit_time_s = self.state.now_s
            if call.segments:  # the engine gets the prompt now: its blocks are in use there, then cached
                events = engine.kv_events
                if events is not None and call.token_chain and events.live:  # what the engine reported holding
                    call.predicted_hit_tokens = events.hit_tokens(call.segments, call.input_tokens)
                    engine.prefix_index.acquire(call.call_id, call.segments, call.input_tokens)
                else:
                    call.predicted_hit_tokens = engine.prefix_index.acquire(call.call_id, call.segments,
                                                                            call.input_tokens)
                self.metrics.predicted_queries.labels(engine.name).inc(call.input_tokens)
                self.metrics.predicted_hits.labels(engine.name).inc(call.predicted_hit_tokens)
            pending.admitted.set_result(True)

    def _enqueue(self, call: CallState, engine: EngineState) -> asyncio.Future:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        key = self.policy.queue_key(call, engine)
        if self.state.workflows[call.workflow_id].deferred:  # behind every call of a workflow not deferred
            key += DEFERRED_OFFSET_S
        heapq.heappush(self.queues[engine.engine_id], _Pending(key, next(self._seq), call, fut))
        engine.queued += 1
        call.engine_id = engine.engine_id
        call.expected_s = engine.expected_call_latency_s(call)  # T_e(s) unless the engine holds part of the prompt
        engine.ledger.place(call.expected_s)
        self.calls_in_flight[call.call_id] = call
        self._pump(engine)
        return fut

    def _defer(self, workflow: WorkflowState) -> None:
        """The admission decision "defer", as `ClusterSimulator.defer_workflow` takes it: from now on
        the workflow's calls wait behind every call of a workflow not deferred and are let through
        to an engine only while it has no other call in flight (background work); its calls queued
        here already move back."""
        workflow.deferred = True
        log.info("workflow %s (tenant %s) deferred by the policy's admission", workflow.key, workflow.tenant)
        self.metrics.deferred.inc()
        for queue in self.queues:
            moved = False
            for pending in queue:
                if pending.call.workflow_id == workflow.workflow_id and pending.key < DEFERRED_OFFSET_S:
                    pending.key += DEFERRED_OFFSET_S
                    moved = True
            if moved:
                heapq.heapify(queue)

    def _release(self, call: CallState, engine: EngineState, admitted: bool) -> None:
        if admitted:
            engine.inflight -= 1
            if not call.background:
                engine.foreground_inflight -= 1
            engine.prefix_index.release(call.call_id)
        engine.ledger.finish(call.expected_s)
        self.calls_in_flight.pop(call.call_id, None)
        self._pump(engine)

    async def acquire(self, call: CallState, exclude: set[int]) -> EngineState:
        """Dispatch + wait for an in-flight slot. Returns the engine; the caller must `release`."""
        waited_since = time.monotonic()
        workflow = self.state.workflows[call.workflow_id]
        if not workflow.deferred and not self.policy.admit(call, self.state):
            self._defer(workflow)
        while True:
            if self.shutting_down:
                raise ShuttingDown()
            engine = self._choose(call, exclude)
            if engine is None:
                remaining = self.config.no_engine_wait_s - (time.monotonic() - waited_since)
                if remaining <= 0:
                    raise NoEngine("no healthy engine")
                self._health_event.clear()
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                    async with asyncio.timeout(min(remaining, 1.0)):
                        await self._health_event.wait()
                except TimeoutError:
                    pass
                continue
            fut = self._enqueue(call, engine)
            try:
                ok = await fut
            except ShuttingDown:
                self._release(call, engine, admitted=False)
                raise
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.result():
                    self._release(call, engine, admitted=True)
                else:
                    fut.cancel()
                    self._release(call, engine, admitted=False)
                raise
            if ok:
                self.metrics.routed.labels(engine.name).inc()
                return engine
            # engine went down while the call was queued: try elsewhere
            self._release(call, engine, admitted=False)
            exclude.add(engine.engine_id)

    def release(self, call: CallState, engine: EngineState) -> None:
        self._release(call, engine, admitted=True)

    def attempt_failed(self, call: CallState, engine: EngineState, exc: Exception) -> None:
        """An upstream attempt failed: count it, and suspect the engine so health checks confirm."""
        self.metrics.retries.labels(engine.name).inc()
        if isinstance(exc, UpstreamError):
            engine.scrape_failures = max(engine.scrape_failures, self.config.unhealthy_after_failures - 1)
        log.warning("call %s failed on %s: %s", call.call_id, engine.name, exc)

    # ------------------------------------------------------------------ health and scraping
    def _mark(self, engine: EngineState, healthy: bool) -> None:
        if engine.healthy == healthy:
            return
        engine.healthy = healthy
        self.metrics.healthy.labels(engine.name).set(int(healthy))
        if healthy:
            log.warning("engine %s is up", engine.name)
            self._rebase_assigned_work()
            self._health_event.set()
            self._pump(engine)
        else:
            if engine.spec.launch is not None:
                source = self.cluster.source or "CLUSTER.yaml"
                hint = f" (start it with `agentsched engines up --cluster {source} --engine {engine.name}`)"
            else:
                hint = f" (is it running at {engine.spec.base_url}? engines without `launch` are started by you)"
            log.warning("engine %s is DOWN%s", engine.name, hint)
            self._clear_scraped(engine)
            engine.prefix_index.clear()  # it comes back with an empty cache
            if engine.kv_events is not None:
                engine.kv_events.clear()
            # hand queued calls back to dispatch (their waiters see False and re-route)
            queue = self.queues[engine.engine_id]
            while queue:
                pending = heapq.heappop(queue)
                engine.queued -= 1
                if not pending.admitted.done():
                    pending.admitted.set_result(False)

    def _clear_scraped(self, engine: EngineState) -> None:
        """A down engine's scraped gauges say nothing any more: zero them in the view, and drop its
        KV-usage sample from /metrics until it is scraped again."""
        engine.scraped_running = 0
        engine.scraped_waiting = 0
        engine.kv_usage = 0.0
        engine.last_scrape_s = None
        try:
            self.metrics.kv_usage.remove(engine.name)
        except KeyError:
            pass

    def _rebase_assigned_work(self) -> None:
        """An engine came back: every engine's cumulative assigned work restarts from its outstanding
        work (`WorkLedger.rebase_assigned`, the simulator's rule too)."""
        for e in self.state.engines:
            e.ledger.rebase_assigned()  # as the simulator does when an engine recovers

    async def _scrape_loop(self, index: int) -> None:
        engine = self.state.engines[index]
        pool = Upstream(engine.spec.base_url, connect_timeout_s=1.0, limit=2)
        interval = self.config.scrape_interval_s
        try:
            await self._scrape_forever(engine, pool, interval)
        finally:
            await pool.close()

    async def _scrape_forever(self, engine: EngineState, pool: Upstream, interval: float) -> None:
        while True:
            t0 = time.monotonic()
            try:
                path = "/metrics" if engine.healthy else "/health"
                resp = await pool.fetch("GET", path, timeout_s=max(1.0, self.config.health_interval_s))
                if resp.status != 200:
                    raise UpstreamError(f"{path} answered {resp.status}")
                if path == "/metrics":
                    self._apply_scrape(engine, parse_vllm_metrics(resp.body.decode("utf-8", "replace")))
                engine.scrape_failures = 0
                self._mark(engine, True)
            except UpstreamError as exc:
                engine.scrape_failures += 1
                if engine.scrape_failures >= self.config.unhealthy_after_failures:
                    self._mark(engine, False)
                log.debug("scrape %s failed: %s", engine.name, exc)
            except Exception:  # noqa: BLE001 - a parse bug must not kill the loop
                log.exception("scrape of %s failed", engine.name)
            self.metrics.queue_len.labels(engine.name).set(engine.queued)
            self.metrics.inflight.labels(engine.name).set(engine.inflight)
            if engine.healthy and engine.last_scrape_s is not None:
                self.metrics.kv_usage.labels(engine.name).set(engine.kv_usage)
            pause = interval if engine.healthy else self.config.health_interval_s
            await asyncio.sleep(max(0.0, pause - (time.monotonic() - t0)))

    def _apply_scrape(self, engine: EngineState, values: dict[str, float]) -> None:
        engine.scraped_running = int(values.get(VLLM_RUNNING, 0))
        engine.scraped_waiting = int(values.get(VLLM_WAITING, 0))
        engine.kv_usage = float(values.get(VLLM_KV_USAGE, 0.0))
        engine.preemptions_total = float(values.get(VLLM_PREEMPTIONS, engine.preemptions_total))
        if "kv_cache_size_tokens" in values:
            engine.scraped_kv_capacity_tokens = int(values["kv_cache_size_tokens"])
            engine.prefix_index.set_capacity(engine.scraped_kv_capacity_tokens)
        queries = values.get(PREFIX_CACHE_QUERIES)
        if queries is not None:
            before = engine.prefix_cache_queries_total
            if before is not None and queries < before:  # counters restarted: so did the engine, with an empty cache
                log.warning("engine %s restarted (its prefix-cache counters went back); its prefix index is cleared",
                            engine.name)
                engine.prefix_index.clear()
            engine.prefix_cache_queries_total = queries
            engine.prefix_cache_hits_total = values.get(PREFIX_CACHE_HITS, 0.0)
            self.metrics.engine_prefix_queries.labels(engine.name).set(queries)
            self.metrics.engine_prefix_hits.labels(engine.name).set(engine.prefix_cache_hits_total)
        self.metrics.index_cached.labels(engine.name).set(engine.prefix_index.cached_tokens)
        engine.last_scrape_s = self.state.now_s

    async def _control_loop(self) -> None:
        """Call `policy.on_interval(view)` every `control_interval_s` (ticks on a fixed grid, no drift)."""
        interval = self.control_interval_s
        start = time.monotonic()
        ticks = 0
        while True:
            ticks += 1
            await asyncio.sleep(max(0.0, start + ticks * interval - time.monotonic()))
            if self.policy.plans_on_twin:  # plans off the event loop; only the twin's snapshot is taken on it
                try:
                    await self._plan_on_twin(ticks)
                except Exception:  # noqa: BLE001
                    log.exception("planning on the digital twin failed")
                self.interval_calls += 1
                # a plan longer than the interval skips the ticks it overran (no back-to-back plans)
                ticks = max(ticks, int((time.monotonic() - start) // interval))
                continue
            t0 = time.perf_counter()
            try:
                self.policy.on_interval(self.state)
            except Exception:  # noqa: BLE001
                log.exception("policy.on_interval failed")
            self.interval_calls += 1
            spent = time.perf_counter() - t0
            if spent > SLOW_CALLBACK_S:
                log.warning("policy.on_interval took %.1f ms (on the event loop)", spent * 1e3)

    async def _gc_loop(self) -> None:
        """Finish workflows that went quiet (clients that never flagged their last call)."""
        while True:
            await asyncio.sleep(min(10.0, self.config.workflow_idle_s))
            now = self.state.now_s
            for wf in list(self.state.open_workflows.values()):
                if wf.inflight == 0 and now - wf.last_seen_s > self.config.workflow_idle_s:
                    self._finish_workflow(wf, wf.last_seen_s)
            self.state.workflows.compact(now)
            self._forget_finished_keys(now)

    # ------------------------------------------------------------------ introspection
    def info(self) -> dict[str, Any]:
        st = self.state
        return {
            "policy": self.policy.spec(),
            "base_slo_s": st.slo.base_slo_s,
            "slo_scale": self.config.slo_scale,
            "token_scale": self.config.token_scale,
            "engines": [
                {"name": e.name, "gpu": e.gpu, "url": e.spec.base_url, "price_per_hour": e.price_per_hour, "healthy": e.healthy, "inflight": e.inflight,
                 "queued": e.queued, "num_running": e.num_running, "num_waiting": e.num_waiting,
                 "kv_usage": e.kv_usage, "preemptions_total": e.preemptions_total, "kv_capacity_tokens": e.kv_capacity_tokens,
                 "scraped_kv_capacity_tokens": e.scraped_kv_capacity_tokens,
                 "assigned_calls": e.assigned_calls, "outstanding_work_s": e.outstanding_work_s,
                 "latency_s": e.latency_table,
                 "prefix_cache_queries_total": e.prefix_cache_queries_total,
                 "prefix_cache_hits_total": e.prefix_cache_hits_total,
                 "prefix_index": {"block_size_tokens": e.prefix_index.block_tokens,
                                  "cached_tokens": e.prefix_index.cached_tokens,
                                  "query_tokens": e.prefix_index.cache.query_tokens,
                                  "predicted_hit_tokens": e.prefix_index.cache.hit_tokens,
                                  "evicted_blocks": e.prefix_index.cache.evicted_blocks},
                 "kv_events": None if e.kv_events is None else {
                     "endpoint": e.spec.kv_events_endpoint, "live": e.kv_events.live, "batches": e.kv_events.batches,
                     "resets": e.kv_events.resets, "cached_tokens": e.kv_events.cached_tokens,
                     "skipped_blocks": e.kv_events.skipped_blocks}}
                for e in st.engines
            ],
            "control_interval_s": self.control_interval_s,
            "interval_calls": self.interval_calls,
            "twin_decisions": list(self.twin_decisions),
            "workflows_arrived": len(st.workflows),
            "workflows_open": len(st.open_workflows),
            "workflows_finished": st.finished_workflows,
            "workflows_met_slo": st.met_workflows,
            "slo_attainment": st.slo_attainment_so_far,
        }
