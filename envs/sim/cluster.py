"""The discrete-event cluster simulator.

Events: workflow arrivals, engine iteration/segment ends, engine failures and recoveries, and
control-interval ticks. Whenever a call becomes ready (its stage's predecessors are done) the
simulator stops and asks for a dispatch decision; `run()` answers with a policy, the Gymnasium
env answers with the agent's action, through the same `next_decision()` / `dispatch()` pair, so
both paths produce identical runs for identical decisions.

The simulator object itself is the `ClusterView` handed to policies.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from mypy_extensions import mypyc_attr

from envs.sim.catalog import load_catalog
from envs.sim.config import ClusterConfig
from envs.sim.engine import Engine, LLMCall
from envs.sim.gc_pause import cyclic_gc_paused
from envs.sim.model import ArrivalWindow, EngineModel, StepTokens, build_engine_model, cluster_slo_model
from envs.sim.view import SchedulingPolicy
from envs.sim.workload import ArrivalProcess, CallSpec, WorkflowSpec, step_mean_tokens

EV_ARRIVAL, EV_ENGINE, EV_FAIL, EV_RECOVER, EV_TICK, EV_CALL_DONE, EV_FRONTEND = range(7)

# A deferred workflow's calls queue behind every call of a workflow that is not deferred, on every
# engine (added to the policy's queue key). It outweighs the local orders' own offsets (hopeless
# calls: 1e8 s, tenant priority levels: 1e9 s per level), so "deferred" is the outermost tier.
DEFERRED_OFFSET_S = 1e12


@dataclass(frozen=True)
class Tenant:
    name: str = "default"
    slo_scale: float = 1.0  # multiplies the scenario's SLO scale
    priority: int = 0  # lower is more important
    share: float = 1.0  # share of arrivals


def _copied_call(call: LLMCall, memo: dict[int, Any]) -> LLMCall:
    """`copy.deepcopy(call, memo)` without its generic dispatch (a fork copies thousands of calls)."""
    twin = memo.get(id(call))
    return twin if twin is not None else call.__deepcopy__(memo)


_COPY_TENANT = Tenant()  # what `Workflow.__deepcopy__` builds with before it sets the copied fields


@dataclass(frozen=True)
class Failure:
    engine: int
    at_s: float
    duration_s: float


# serializable: `envs.sim.fork` deep-copies the simulator (also when compiled with mypyc)
@mypyc_attr(serializable=True)
class Workflow:
    """A query in flight. Satisfies `WorkflowView`."""

    __slots__ = ("workflow_id", "tenant", "priority", "arrival_time_s", "slo_s", "deadline_s", "stages",
                 "stage_index", "pending_in_stage", "calls_done", "finish_time_s", "failed", "pointer",
                 "expected_remaining_s", "n_calls", "attained_service_s", "critical_path_service_s",
                 "stage_ready_critical_path_s", "deferred")

    def __init__(self, workflow_id: int, tenant: Tenant, arrival_time_s: float, slo_s: float,
                 stages: list[list[LLMCall]]):
        self.workflow_id = workflow_id
        self.tenant = tenant.name
        self.priority = tenant.priority
        self.arrival_time_s = arrival_time_s
        self.slo_s = slo_s
        self.deadline_s = arrival_time_s + slo_s
        self.stages = stages
        self.stage_index = -1
        self.pending_in_stage = 0
        self.calls_done = 0
        self.finish_time_s = math.nan
        self.failed = False
        self.pointer = 0  # position reached in the standard workflow (deadline rule)
        self.expected_remaining_s = 0.0
        self.n_calls = sum(len(s) for s in stages)
        self.attained_service_s = 0.0
        self.critical_path_service_s = 0.0
        # the critical-path value every call of the current stage recorded when it became ready
        # (a stage's calls become ready together)
        self.stage_ready_critical_path_s = 0.0
        # given up on by the policy's admission decision (`ClusterSimulator.defer_workflow`): it still
        # runs, behind every workflow that is not deferred, and counts as missed if it ends late
        self.deferred = False

    def __deepcopy__(self, memo: dict[int, Any]) -> "Workflow":
        """The copy a fork (`envs.sim.fork`) takes, field by field (see `LLMCall.__deepcopy__`);
        its calls are copied through `memo`, so they stay the very calls of the engines' copied queues."""
        twin = Workflow(self.workflow_id, _COPY_TENANT, self.arrival_time_s, self.slo_s, [])
        memo[id(self)] = twin
        twin.tenant = self.tenant
        twin.priority = self.priority
        twin.deadline_s = self.deadline_s
        twin.stages = [[_copied_call(call, memo) for call in stage] for stage in self.stages]
        twin.stage_index = self.stage_index
        twin.pending_in_stage = self.pending_in_stage
        twin.calls_done = self.calls_done
        twin.finish_time_s = self.finish_time_s
        twin.failed = self.failed
        twin.pointer = self.pointer
        twin.expected_remaining_s = self.expected_remaining_s
        twin.n_calls = self.n_calls
        twin.attained_service_s = self.attained_service_s
        twin.critical_path_service_s = self.critical_path_service_s
        twin.stage_ready_critical_path_s = self.stage_ready_critical_path_s
        twin.deferred = self.deferred
        return twin

    @property
    def done(self) -> bool:
        return not math.isnan(self.finish_time_s)

    @property
    def met_slo(self) -> bool:
        return self.done and not self.failed and self.finish_time_s - self.arrival_time_s <= self.slo_s + 1e-9


# an exception class stays a plain Python class when compiled (mypyc cannot subclass RuntimeError natively)
@mypyc_attr(native_class=False)
class SimulationError(RuntimeError):
    """A decision the simulator cannot carry out (e.g. dispatch to a failed engine)."""


# allow_interpreted_subclasses: built from interpreted code (see `envs.sim.engine.LLMCall`)
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class ClusterSimulator:
    def __init__(
        self,
        cluster: ClusterConfig,
        workflows: Sequence[WorkflowSpec],
        arrival_times_s: Sequence[float] | np.ndarray,
        slo_scale: float,
        queue_key: Callable[[LLMCall, Engine], float] | None = None,
        tenants: Sequence[Tenant] = (Tenant(),),
        failures: Sequence[Failure] = (),
        step_tokens: dict[str, tuple[float, float]] | StepTokens | None = None,
        standard: Sequence[str] | None = None,
        tenant_seed: int = 0,
        record_timeline: bool = False,
        tick_interval_s: float | None = None,
        on_tick: Callable[["ClusterSimulator"], None] | None = None,
        policy: SchedulingPolicy | None = None,
        prefix_cache: bool = True,
        deferred_background: bool = True,
        arrival_model: ArrivalProcess | None = None,
    ):
        """`policy`, when given, is the one policy of the run: its queue_key orders every engine's
        queue, its on_interval ticks every interval_s, and `run()` asks it for every dispatch
        (the Gymnasium env passes no policy and answers dispatch decisions itself).
        `deferred_background`: a deferred workflow's calls are background work, admitted into an
        engine's batch only when it runs nothing else (else they only queue last, and fill free
        batch slots, slowing the batch for everyone).
        `arrival_model`: the process the arrival times were drawn from, the forecast a fork of the
        run draws its future arrivals from (`envs.sim.fork`); None: the recent arrival rate."""
        if len(arrival_times_s) != len(workflows):
            raise ValueError("one arrival time per workflow")
        catalog = load_catalog()
        self.config = cluster
        self.step_tokens = (step_tokens if isinstance(step_tokens, StepTokens)
                            else StepTokens(step_tokens or step_mean_tokens(workflows)))
        self.engines: list[Engine] = []
        twins: dict[str, EngineModel] = {}  # engines configured alike but for their names share latency memos
        for i, spec in enumerate(cluster.expanded()):
            model = build_engine_model(spec, self.step_tokens, catalog)
            twin = twins.setdefault(spec.model_dump_json(exclude={"name"}), model)
            if twin is not model:
                model.share_memos(twin)
            engine = Engine(i, model, spec, prefix_cache=prefix_cache)
            if record_timeline:
                engine.timeline = []
            self.engines.append(engine)
        models = [e.model for e in self.engines]
        self.slo = cluster_slo_model(models, self.step_tokens.steps(), standard)
        self.slo_scale = slo_scale
        self.policy = policy
        if policy is not None:
            queue_key = queue_key or policy.queue_key
            if policy.interval_s and tick_interval_s is None:
                tick_interval_s, on_tick = float(policy.interval_s), policy.on_interval
        self.queue_key = queue_key or (lambda call, engine: call.ready_time_s)
        self.tenants = list(tenants)
        self.now_s = 0.0
        self._events: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self._ready: deque[LLMCall] = deque()
        self._parked: list[LLMCall] = []  # ready calls waiting for any healthy engine
        self.workflows: list[Workflow] = []
        self.calls: list[LLMCall] = []
        self._specs = list(workflows)
        self._arrivals = np.asarray(arrival_times_s, dtype=float)
        self.arrival_model = arrival_model
        rng = np.random.default_rng(tenant_seed)
        shares = np.array([t.share for t in self.tenants], dtype=float)
        self._tenant_of = rng.choice(len(self.tenants), size=len(workflows), p=shares / shares.sum())
        self._next_arrival = 0
        self._recent_arrivals = ArrivalWindow()
        self.finished_workflows = 0
        self.met_workflows = 0
        self.failed_calls = 0
        self.decisions = 0
        self.wall_s = 0.0
        self._on_tick = on_tick
        self._tick_interval_s = tick_interval_s
        self.prefix_cache = prefix_cache
        self.deferred_background = deferred_background
        # chain keys of prompt prefixes: (parent chain key, segment identity) -> int, like vLLM's
        # block hashes (a key names the whole text from the prompt's first token); a call's own
        # rest gets a fresh key of the same counter (never shared, so never looked up)
        self._chain_keys: dict[tuple, int] = {}
        self._n_chain_keys = 0
        self._template_chains: dict[tuple, tuple[tuple[tuple[int, int], ...], int]] = {}  # segments -> chain, tokens
        self._positions: dict[tuple[str, int], tuple[int, float]] = {}  # (step, pointer) -> SLO position, rest
        if len(workflows):
            self._push(float(self._arrivals[0]), EV_ARRIVAL, 0, 0)
        for f in failures:
            if not 0 <= f.engine < len(self.engines):
                raise ValueError(f"failures: engine {f.engine} does not exist (cluster has {len(self.engines)})")
            self._push(f.at_s, EV_FAIL, f.engine, 0)
            self._push(f.at_s + f.duration_s, EV_RECOVER, f.engine, 0)
        if tick_interval_s:
            self._push(tick_interval_s, EV_TICK, 0, 0)

    # ---- ClusterView ------------------------------------------------------------------------
    def workflow(self, workflow_id: int) -> Workflow:
        return self.workflows[workflow_id]

    @property
    def recent_arrival_rate_qps(self) -> float:
        return self._recent_arrivals.rate_qps(self.now_s)

    @property
    def slo_attainment_so_far(self) -> float:
        return self.met_workflows / self.finished_workflows if self.finished_workflows else 1.0

    @property
    def done(self) -> bool:
        return not self._ready and not self._events and not self._parked

    # ---- event plumbing ------------------------------------------------------------------------
    def _push(self, t: float, kind: int, a: int, b: int) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, a, b))

    def next_decision(self, until_s: float = math.inf) -> LLMCall | None:
        """Process events until a call needs a dispatch decision (returned), or until `until_s`
        or the end of the simulation (None)."""
        started = time.perf_counter()
        events = self._events
        ready = self._ready
        engines = self.engines
        heappop = heapq.heappop
        try:
            while not ready:
                if not events or events[0][0] > until_s:
                    if until_s != math.inf and until_s > self.now_s:
                        self.now_s = until_s
                    return None
                t, _, kind, a, b = heappop(events)
                self.now_s = t
                if kind == EV_ENGINE:
                    engine = engines[a]
                    if b != engine.version:
                        continue  # superseded plan
                    self._engine_done(engine, t)  # the engine's iteration/segment ends
                    if not ready:
                        continue  # no stage became ready: no decision to make
                elif kind == EV_CALL_DONE:
                    self._call_finished(self.calls[a], t)
                elif kind == EV_FRONTEND:
                    self._reach_scheduler(self.calls[a], b, t)  # b: the dispatch attempt it belongs to
                elif kind == EV_ARRIVAL:
                    self._arrive(a, t)
                elif kind == EV_FAIL:
                    self._fail(self.engines[a], t)
                elif kind == EV_RECOVER:
                    self._recover(self.engines[a], t)
                elif kind == EV_TICK:
                    if self._on_tick is not None:
                        self._on_tick(self)
                    if self._tick_interval_s and (events or ready):
                        self._push(t + self._tick_interval_s, EV_TICK, 0, 0)
                if ready and not any(e.healthy for e in engines):
                    while ready:  # nowhere to send them: hold until an engine recovers
                        self._parked.append(ready.popleft())
            return ready[0]
        finally:
            self.wall_s += time.perf_counter() - started

    def dispatch(self, call: LLMCall, engine_id: int) -> None:
        """Place the ready call at the head of the queue on an engine."""
        ready = self._ready
        if not ready or ready[0] is not call:
            raise SimulationError("dispatch() must answer the call returned by next_decision()")
        engines = self.engines
        if not 0 <= engine_id < len(engines):
            raise SimulationError(f"engine {engine_id} does not exist (cluster has {len(engines)})")
        engine = engines[engine_id]
        if not engine.healthy:
            raise SimulationError(f"engine {engine_id} ({engine.name}) is down; dispatch to a healthy engine")
        ready.popleft()
        self.decisions += 1
        now = self.now_s
        call.engine_id = engine_id
        call.dispatch_time_s = now
        call.attempts += 1
        if call.input_tokens + call.output_tokens > engine.kv_capacity_tokens:  # not engine.fits(call)
            # like vLLM rejecting a prompt longer than the engine's KV/max_model_len
            self._call_failed(call, now)
            return
        expected = engine.expected_call_latency_s(call)  # T_e(s) unless the engine holds part of the prompt
        call.expected_s = expected
        engine.ledger.place(expected)
        if engine.call_frontend_s > 0.0:
            engine.in_frontend.append(call)
            self._push(engine.frontend_ready_s(now), EV_FRONTEND, call.call_id, call.attempts)
            return
        engine.enqueue(call, self._queue_key_of(call, engine))
        self._kick(engine, now)

    def _queue_key_of(self, call: LLMCall, engine: Engine) -> float:
        """The policy's queue key, behind every non-deferred workflow if the call's workflow is deferred."""
        key = self.queue_key(call, engine)
        return key + DEFERRED_OFFSET_S if self.workflows[call.workflow_id].deferred else key

    def defer_workflow(self, workflow_id: int) -> None:
        """The admission decision "defer": from now on the workflow's calls wait behind every call of
        a workflow that is not deferred, on every engine; its calls already queued move back too.
        The workflow still runs when nothing else waits (work-conserving) and is scored as usual."""
        workflow = self.workflows[workflow_id]
        if workflow.deferred:
            return
        workflow.deferred = True
        for engine in self.engines:
            if self.deferred_background:
                engine.background_key_s = DEFERRED_OFFSET_S
            changed = False
            for i, (key, seq, call) in enumerate(engine.waiting):
                if call.workflow_id == workflow_id:
                    call.key = key + DEFERRED_OFFSET_S
                    engine.waiting[i] = (call.key, seq, call)
                    changed = True
            if changed:
                heapq.heapify(engine.waiting)
            for call in engine.running:  # a preempted call goes back to the queue with its key
                if call.workflow_id == workflow_id:
                    call.key += DEFERRED_OFFSET_S

    def _reach_scheduler(self, call: LLMCall, attempt: int, now: float) -> None:
        """A call leaves its engine's API server (call_frontend_s after it was its turn)."""
        engine = self.engines[call.engine_id]
        frontend = engine.in_frontend
        if attempt != call.attempts or not frontend or frontend[0] is not call:
            return  # its engine failed meanwhile: _fail already sent the call back to dispatch
        frontend.popleft()
        end = engine.stretch(engine.call_frontend_s)
        if end is not None:
            engine.version += 1
            self._push(end, EV_ENGINE, engine.engine_id, engine.version)
        engine.enqueue(call, self._queue_key_of(call, engine))
        self._kick(engine, now)

    def healthy_engines(self) -> list[int]:
        return [e.engine_id for e in self.engines if e.healthy]

    def run(self, policy: SchedulingPolicy | None = None, until_s: float = math.inf) -> None:
        """Run to the end (or to `until_s`), answering every dispatch decision with `policy` (default:
        the run's own): first its admission decision for the call's workflow (unless already
        deferred), then the engine. Rollouts of the lookahead planners run the same loop."""
        policy = policy or self.policy
        if policy is None:
            raise SimulationError("run() needs a policy (pass it to the simulator or to run)")
        # the loop allocates many small objects that form no reference cycles (calls, cache
        # nodes, event tuples) while the run's calls stay alive (see `cyclic_gc_paused`)
        with cyclic_gc_paused():
            next_decision = self.next_decision
            dispatch = self.dispatch
            choose = policy.dispatch
            admit = policy.admit
            workflows = self.workflows
            while True:
                call = next_decision(until_s)
                if call is None:
                    return
                if not workflows[call.workflow_id].deferred and not admit(call, self):
                    self.defer_workflow(call.workflow_id)
                dispatch(call, choose(call, self))

    # ---- transitions ---------------------------------------------------------------------------
    def _kick(self, engine: Engine, now: float) -> None:
        """New work at an engine: start it if idle, or cut a long decode segment short."""
        if math.isnan(engine.busy_until_s):
            end = engine.plan(now, self._on_preempt)
            if end is not None:
                self._push(end, EV_ENGINE, engine.engine_id, engine.version)
        else:
            end = engine.interrupt(now)
            if end is not None:
                engine.version += 1
                self._push(end, EV_ENGINE, engine.engine_id, engine.version)

    def _on_preempt(self, call: LLMCall) -> None:
        pass  # counted on the call and the engine

    def _engine_done(self, engine: Engine, now: float) -> None:
        finished = engine.complete(now)
        if finished:
            overhead = engine.request_overhead_s
            ledger = engine.ledger
            for call in finished:
                ledger.finish(call.expected_s)
                if overhead > 0.0:  # response still travelling back (detokenise, HTTP)
                    call.finish_time_s = now + overhead
                    self._push(call.finish_time_s, EV_CALL_DONE, call.call_id, 0)
                else:
                    self._call_finished(call, now)
        if engine.healthy and engine.busy_until_s != engine.busy_until_s:  # nan: idle
            end = engine.plan(now, self._on_preempt)
            if end is not None:
                self._seq += 1
                heapq.heappush(self._events, (end, self._seq, EV_ENGINE, engine.engine_id, engine.version))

    def _arrive(self, index: int, now: float) -> None:
        spec = self._specs[index]
        tenant = self.tenants[int(self._tenant_of[index])]
        wid = len(self.workflows)
        stages: list[list[LLMCall]] = []
        all_calls = self.calls
        tenant_name = tenant.name
        priority = tenant.priority
        prefix_cache = self.prefix_cache
        for si, stage in enumerate(spec.stages):
            calls = []
            fanout = len(stage)
            for c in stage:
                call_id = len(all_calls)
                # prompt structure only matters to a prefix cache (none: skip the work)
                segments = self._chain(c, call_id, wid, tenant_name) if prefix_cache and c.segments else ()
                call = LLMCall(call_id, wid, tenant_name, c.step, si, fanout, c.input_tokens,
                               c.output_tokens, priority, segments)
                all_calls.append(call)
                calls.append(call)
            stages.append(calls)
        slo_s = self.slo.base_slo_s * self.slo_scale * tenant.slo_scale
        workflow = Workflow(wid, tenant, now, slo_s, stages)
        self.workflows.append(workflow)
        self._recent_arrivals.note(now)
        self._start_next_stage(workflow, now)
        self._next_arrival = index + 1
        if self._next_arrival < len(self._specs):
            self._push(float(self._arrivals[self._next_arrival]), EV_ARRIVAL, self._next_arrival, 0)

    def _chain(self, spec: CallSpec, call_id: int, workflow_id: int, tenant: str) -> tuple[tuple[int, int], ...]:
        """The call's prompt as (chain key, tokens) segments: its shared segments, then its own
        rest (unique to the call), covering exactly its input tokens."""
        segments = spec.segments
        known = self._template_chains.get(segments)  # prompts that share only templates: computed once
        if known is None:
            keys = self._chain_keys
            parent = -1
            out: list[tuple[int, int]] = []
            used = 0
            templates_only = True
            for seg in segments:
                # the text's identity: (scope, name, length) within its scope (a prompt cut short
                # of a template holds a different, shorter text); the lookup key is (parent,
                # segment) for templates and (parent, tenant name or workflow id, segment) otherwise
                scope = seg[0]
                at: tuple
                if scope == "template":
                    at = (parent, seg)
                else:
                    templates_only = False
                    at = (parent, tenant, seg) if scope == "tenant" else (parent, workflow_id, seg)
                key = keys.get(at)
                if key is None:
                    key = keys[at] = self._n_chain_keys
                    self._n_chain_keys += 1
                parent = key
                tokens = seg[2]
                out.append((key, tokens))
                used += tokens
            chain = tuple(out)
            if templates_only:
                self._template_chains[segments] = (chain, used)
        else:
            chain, used = known
        if spec.input_tokens > used:
            chain += ((self._n_chain_keys, spec.input_tokens - used),)
            self._n_chain_keys += 1
        return chain

    def _start_next_stage(self, workflow: Workflow, now: float) -> None:
        workflow.stage_index += 1
        if workflow.stage_index >= len(workflow.stages):
            workflow.finish_time_s = now
            self.finished_workflows += 1
            if workflow.met_slo:
                self.met_workflows += 1
            return
        stage = workflow.stages[workflow.stage_index]
        workflow.pending_in_stage = len(stage)
        workflow.stage_ready_critical_path_s = workflow.critical_path_service_s
        step = stage[0].step
        slo = self.slo
        at = (step, workflow.pointer)
        known = self._positions.get(at)
        if known is None:  # the SLO rule's standard position is a function of (step, pointer)
            position = slo.position(step, workflow.pointer)
            known = self._positions[at] = (position, slo.remaining_after(position))
        position, workflow.expected_remaining_s = known
        workflow.pointer = position + 1
        deadline = slo.call_deadline_s(now, workflow.deadline_s, step, position)
        workflow_deadline = workflow.deadline_s
        ready = self._ready
        for call in stage:
            call.ready_time_s = now
            call.deadline_s = deadline
            call.workflow_deadline_s = workflow_deadline
            call.position = position
            ready.append(call)

    def _call_finished(self, call: LLMCall, now: float) -> None:
        workflow = self.workflows[call.workflow_id]
        workflow.calls_done += 1
        # service: engine time from (first) admission to finish, queueing at the engine excluded
        admit = call.admit_time_s
        service_s = now - admit if admit == admit else 0.0  # never admitted (nan): none
        workflow.attained_service_s += service_s
        path = workflow.stage_ready_critical_path_s + service_s
        if path > workflow.critical_path_service_s:
            workflow.critical_path_service_s = path
        pending = workflow.pending_in_stage - 1
        workflow.pending_in_stage = pending
        if pending == 0 and not workflow.failed:
            self._start_next_stage(workflow, now)

    def _call_failed(self, call: LLMCall, now: float) -> None:
        call.finish_time_s = math.nan
        self.failed_calls += 1
        workflow = self.workflows[call.workflow_id]
        if not workflow.failed:
            workflow.failed = True
            workflow.finish_time_s = now
            self.finished_workflows += 1

    def _fail(self, engine: Engine, now: float) -> None:
        engine.healthy = False
        for call in engine.drain():
            self._ready.append(call)  # back to dispatch, keeping its readiness time and deadline

    def _recover(self, engine: Engine, now: float) -> None:
        engine.healthy = True
        for e in self.engines:
            e.ledger.rebase_assigned()  # the gateway's rule too (deploy/gateway/core.py)
        engine.version += 1
        parked, self._parked = self._parked, []
        self._ready.extend(parked)

    def park(self, call: LLMCall) -> None:
        """No healthy engine: hold the ready call until one recovers."""
        if self._ready and self._ready[0] is call:
            self._ready.popleft()
        self._parked.append(call)
