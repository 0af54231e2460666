"""Start a simulation from any state: fork a running simulator, or build a twin from a view.

`fork(sim, seed)` is an independent copy of a running `ClusterSimulator` (the original is never
touched) whose unknowns are redrawn from the workload's models, seeded:

- output lengths of every call not yet finished (running, queued, or in a later stage of an
  arrived workflow) from its step's fitted bivariate log-normal (`TraceGenerator` fits), conditioned
  on the call's known input length and on the tokens it has generated (at least generated + 1,
  counting the iterations of a decode segment already done by now);
- the workflows that have not arrived yet, from the workload's generator;
- their arrival times, from the arrival model: the process the run's arrivals come from
  (`ClusterSimulator.arrival_model`, the forecast of a load step or burst: its `times_after` now),
  or, for a simulator without one or with `arrivals="recent"`, Poisson at the recent arrival rate
  the view shows (`recent_arrival_rate_qps`), starting now, which does not extrapolate a step or
  burst.

The same seed gives the same draws: candidates compared from one state with one seed see common
random numbers. With `resample=False` nothing is redrawn (the clairvoyant fork: true lengths and
arrivals), and a rollout of the fork with the original's policy reproduces the original run.

The copy is a `copy.deepcopy` of the dynamic state; the static parts (engine models and their
iteration models, the SLO model, the configuration, the workload specs, finished workflows and
their calls) are shared, so a fork costs what is in flight, not the length of the run so far
(benchmarks/fork_speed.py reports the time per fork). Calls, workflows and cache nodes copy
themselves field by field (their `__deepcopy__`), and a fork that knows where its rollout stops
(`until_s`) draws only the arrivals before it.

`simulator_from_view(view, calls, ...)` builds such a simulator from a view that is not a
simulator (the gateway's `ClusterState`): the gateway's digital twin. The twin can be forked like
any simulator: its forks draw from the generator it was built with and at the view's arrival rate,
so a planner's code (`Policy.plan_interval`) is the same on the twin and in `simulate`.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections import OrderedDict
from typing import Any, Literal, Protocol, Sequence, get_args

import numpy as np
from scipy.special import ndtr, ndtri

from envs.sim.cluster import EV_ARRIVAL, EV_ENGINE, EV_TICK, ClusterSimulator, Tenant
from envs.sim.config import ClusterConfig, EngineConfig
from envs.sim.engine import Engine, LLMCall
from envs.sim.model import ARRIVAL_RATE_WINDOW_S, ArrivalWindow, EngineModel
from envs.sim.slo import SLOModel
from envs.sim.view import CallView, SchedulingPolicy, WorkflowView
from envs.sim.workload import ArrivalProcess, CallSpec, TraceGenerator, WorkflowSpec

ArrivalSource = Literal["model", "recent", "known"]  # where a fork's future arrivals come from (`fork`)
LengthSource = Literal["sample", "median"]  # how a fork sets unknown output lengths
ARRIVAL_SOURCES: tuple[ArrivalSource, ...] = get_args(ArrivalSource)
LENGTH_SOURCES: tuple[LengthSource, ...] = get_args(LengthSource)
MIN_ARRIVAL_RATE_QPS = 1e-3  # a view that saw no arrival yet: (almost) none expected
_GENERATORS: "OrderedDict[int, tuple[Sequence[WorkflowSpec], TraceGenerator]]" = OrderedDict()
_GENERATOR_CACHE_SIZE = 8


class PlacedCallView(CallView, Protocol):
    """A call of a live view that has been placed on an engine (the gateway's `CallState`)."""

    engine_id: int


class ModelledEngineView(Protocol):
    """What a twin reads of a live engine: its engine model, name and health (the gateway's
    `EngineState`, or a copy of those)."""

    @property
    def name(self) -> str: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def model(self) -> EngineModel: ...


class ModelledClusterView(Protocol):
    """What a twin reads of a live view: the clock, the recent arrival rate, the engines and the
    workflows of the calls in flight (the gateway's `ClusterState`, or a snapshot of it taken on
    the gateway's event loop so that a worker thread can build the twin)."""

    @property
    def now_s(self) -> float: ...

    @property
    def recent_arrival_rate_qps(self) -> float: ...

    @property
    def engines(self) -> Sequence[ModelledEngineView]: ...

    def workflow(self, workflow_id: int) -> WorkflowView: ...


def workload_generator(specs: Sequence[WorkflowSpec]) -> TraceGenerator:
    """The generator fitted to a run's workflows (cached per workflow list, so forking a run many
    times fits it once), or the one a twin was built with (`simulator_from_view` registers it)."""
    key = id(specs)
    hit = _GENERATORS.get(key)
    if hit is not None and hit[0] is specs:
        _GENERATORS.move_to_end(key)
        return hit[1]
    generator = TraceGenerator.fit(specs, name="fork")
    _remember_generator(specs, generator)
    return generator


def _remember_generator(specs: Sequence[WorkflowSpec], generator: TraceGenerator) -> None:
    _GENERATORS[id(specs)] = (specs, generator)
    while len(_GENERATORS) > _GENERATOR_CACHE_SIZE:
        _GENERATORS.popitem(last=False)


def token_scaled(specs: Sequence[WorkflowSpec], token_scale: float) -> list[WorkflowSpec]:
    """`specs` with every call's input and output lengths times `token_scale` (at least 1 token;
    prompt segments dropped): the workload a gateway with that `token_scale` sees (the replay
    sends such calls to tiny CPU engines), to fit its twin's generator to."""
    if token_scale == 1.0:
        return list(specs)
    return [WorkflowSpec(tuple(tuple(CallSpec(c.step, max(1, round(c.input_tokens * token_scale)),
                                              max(1, round(c.output_tokens * token_scale))) for c in stage)
                               for stage in wf.stages), source=wf.source) for wf in specs]


def arrival_window_at_rate(rate_qps: float, now_s: float) -> ArrivalWindow:
    """An arrival window that reads about `rate_qps` at `now_s` (arrivals evenly spaced over the
    window): a twin's, so its forks draw future arrivals at the live view's recent rate rather than
    at the burst of in-flight workflows the twin saw arrive at once."""
    window = ArrivalWindow()
    span_s = max(1.0, min(ARRIVAL_RATE_WINDOW_S, now_s))
    count = int(round(rate_qps * span_s))
    for k in range(count):
        window.note(now_s - span_s * (count - k - 0.5) / count)
    return window


def conditional_output_tokens(generator: TraceGenerator, step: str, input_tokens: np.ndarray,
                              at_least: np.ndarray, rng: np.random.Generator, median: bool = False) -> np.ndarray | None:
    """Output lengths of calls of `step` drawn from the step's fitted bivariate log-normal given
    their input lengths, truncated below at `at_least` (inverse-CDF sampling of the truncated
    conditional normal) and capped at the fit's largest output (never below `at_least`); with
    `median`, the truncated conditional's median instead of a draw (no random numbers used). None
    when the generator knows no such step."""
    fit = generator.token_fits.get(step)
    if fit is None:
        return None
    mu_in, mu_out = float(fit.mean[0]), float(fit.mean[1])
    var_in, cov, var_out = float(fit.cov[0, 0]), float(fit.cov[0, 1]), float(fit.cov[1, 1])
    mean = mu_out + cov / var_in * (np.log(np.maximum(input_tokens, 1)) - mu_in)
    sd = math.sqrt(max(var_out - cov * cov / var_in, 1e-12))
    # P(round(exp(X)) >= m) ~ P(X >= log(m - 0.5))
    low = ndtr((np.log(np.maximum(at_least - 0.5, 0.5)) - mean) / sd)
    u = low + (0.5 if median else rng.random(len(mean))) * (1.0 - low)
    draws = np.exp(mean + sd * ndtri(np.clip(u, 1e-12, 1.0 - 1e-12)))
    out = np.minimum(np.rint(draws), fit.max_tokens[1])
    return np.maximum(out, at_least).astype(int)


def _static_memo(sim: ClusterSimulator) -> dict[int, Any]:
    """Objects the copy shares with the original: nothing in them changes while a run goes on."""
    shared: list[Any] = [sim.config, sim.slo, sim.step_tokens, sim.tenants, sim._specs, sim.policy, sim.queue_key,
                         sim._on_tick, sim.arrival_model]
    for engine in sim.engines:
        shared += [engine.model, engine.perf, engine.config, engine.expected_latency_s]
    for tenant in sim.tenants:
        shared.append(tenant)
    # a workflow that finished (not failed: a failed one's other calls may still run) never changes
    # again, nor do its calls: shared, so a fork costs what is still in flight, not the run so far
    for wf in sim.workflows:
        if wf.done and not wf.failed:
            shared.append(wf)
            shared.extend(call for stage in wf.stages for call in stage)
    memo = {id(x): x for x in shared if x is not None}
    # flat tables of immutable keys and values: copied in C
    memo[id(sim._chain_keys)] = dict(sim._chain_keys)
    memo[id(sim._template_chains)] = dict(sim._template_chains)
    return memo


def fork(sim: ClusterSimulator, seed: int, resample: bool = True, policy: SchedulingPolicy | None = None,
         generator: TraceGenerator | None = None, arrival_rate_qps: float | None = None,
         until_s: float = math.inf, arrivals: ArrivalSource = "model", lengths: LengthSource = "sample") -> ClusterSimulator:
    """An independent copy of `sim` in its current state, with the unknowns redrawn (see the module
    docstring); `sim` is left untouched.

    `policy` becomes the copy's policy (run(), queue order of new placements, ticks); by default a
    deep copy of the original's, so a rollout never moves the original policy's state. `generator`
    is the workload model to draw from (default: fitted to the run's workflows); `arrival_rate_qps`
    overrides the rate of future arrivals; otherwise `arrivals` says where they come from: "model",
    the simulator's arrival model when it has one, "recent", Poisson at the view's recent rate, or
    "known", the run's own future arrivals (clairvoyant about arrivals only: an experiment that
    separates what redrawing the lengths costs a planner from what redrawing the arrivals costs).
    `lengths`: "sample" draws each unfinished call's output length, "median" sets it to the median
    of the same conditional distribution (a point forecast: no sampling noise between forks).
    `until_s`: the time a rollout of the copy stops at; redrawn workflows that would arrive later
    are not drawn at all (drawing them was most of a fork's cost on a long run), so the copy's run
    ends with the last arrival before it."""
    memo = _static_memo(sim)
    calls: list[LLMCall] = []  # every call of the run: filled below, not element by element by deepcopy
    memo[id(sim.calls)] = calls
    twin: ClusterSimulator = copy.deepcopy(sim, memo)
    calls.extend([memo[id(call)] for call in sim.calls])  # each is shared (finished) or copied with its workflow
    own_policy = policy if policy is not None else (copy.deepcopy(sim.policy) if sim.policy is not None else None)
    if own_policy is not None:
        if sim.policy is not None and sim.queue_key == sim.policy.queue_key:
            twin.queue_key = own_policy.queue_key
        if sim.policy is not None and sim._on_tick == sim.policy.on_interval:
            twin._on_tick = own_policy.on_interval if own_policy.interval_s else None
        twin.policy = own_policy
    twin.wall_s = 0.0
    if resample:
        rng = np.random.default_rng([seed, 16])
        _resample_outputs(twin, generator or workload_generator(sim._specs), rng, lengths == "median")
        model = sim.arrival_model if arrivals == "model" and arrival_rate_qps is None else None
        if arrivals != "known" or arrival_rate_qps is not None:
            _resample_arrivals(twin, generator or workload_generator(sim._specs), rng,
                               arrival_rate_qps if arrival_rate_qps is not None else sim.recent_arrival_rate_qps,
                               until_s, model)
    return twin


def _resample_outputs(sim: ClusterSimulator, generator: TraceGenerator, rng: np.random.Generator,
                      median: bool = False) -> None:
    """Redraw the output length of every unfinished call of an arrived workflow, then cut the
    decode segments in flight at the iteration in progress so engines replan with the new lengths."""
    now = sim.now_s
    at_least_of: dict[int, int] = {}
    for engine in sim.engines:
        done_in_segment = 0
        if engine._seg_cost is not None and engine._seg_k > 1:
            done_in_segment = engine._seg_cost.iterations_within(now - engine._seg_start_s, engine._seg_k)
        for call in engine.running:
            at_least_of[call.call_id] = call.generated + done_in_segment + 1
    by_step: dict[str, list[LLMCall]] = {}
    for wf in sim.workflows:
        if wf.done or wf.failed:
            continue
        for stage in wf.stages[max(wf.stage_index, 0):]:
            for call in stage:
                if call.generated < call.output_tokens:
                    by_step.setdefault(call.step, []).append(call)
    for step in sorted(by_step):
        calls = by_step[step]
        inputs = np.array([c.input_tokens for c in calls], dtype=float)
        at_least = np.array([at_least_of.get(c.call_id, c.generated + 1) for c in calls], dtype=float)
        drawn = conditional_output_tokens(generator, step, inputs, at_least, rng, median)
        if drawn is None:
            continue
        for call, out in zip(calls, drawn.tolist()):
            call.output_tokens = int(out)
    for engine in sim.engines:
        if not math.isnan(engine.busy_until_s):
            end = engine.interrupt(now)
            if end is not None:
                engine.version += 1
                sim._push(end, EV_ENGINE, engine.engine_id, engine.version)


def _resample_arrivals(sim: ClusterSimulator, generator: TraceGenerator, rng: np.random.Generator,
                       rate_qps: float, until_s: float, model: ArrivalProcess | None) -> None:
    """New workflows for the ones not arrived yet, arriving from now as `model` forecasts, or as a
    Poisson process at `rate_qps` without one; only those arriving by `until_s` (the run's
    remaining count at most)."""
    first = sim._next_arrival
    n_future = len(sim._specs) - first
    if n_future <= 0:
        return
    if model is not None:
        times = model.times_after(sim.now_s, n_future, rng)
    else:
        rate = max(rate_qps, MIN_ARRIVAL_RATE_QPS)
        times = sim.now_s + np.cumsum(rng.exponential(1.0 / rate, size=n_future))
    shares = np.array([t.share for t in sim.tenants], dtype=float)
    tenants = rng.choice(len(sim.tenants), size=n_future, p=shares / shares.sum())
    drawn = int(np.searchsorted(times, until_s, side="right"))
    sim._specs = list(sim._specs[:first]) + generator.sample(drawn, rng, prompt_segments=sim.prefix_cache)
    sim._arrivals = np.concatenate([sim._arrivals[:first], times[:drawn]])
    sim._tenant_of = np.concatenate([sim._tenant_of[:first], tenants[:drawn]])
    sim._events = [ev for ev in sim._events if ev[2] != EV_ARRIVAL]
    heapq.heapify(sim._events)
    if drawn:
        sim._push(float(times[0]), EV_ARRIVAL, first, 0)


def simulator_from_view(view: ModelledClusterView, calls: Sequence[PlacedCallView], engine_configs: Sequence[EngineConfig],
                        slo_scale: float, seed: int, generator: TraceGenerator, future_queries: int = 0,
                        policy: SchedulingPolicy | None = None, prefix_cache: bool = False,
                        slo: SLOModel | None = None) -> ClusterSimulator:
    """The digital twin of a live cluster: a simulator in the view's state, its unknowns drawn.

    - Engines: one per view engine, built on that engine's own `model` (the gateway's `EngineState`
      holds the simulator's `EngineModel`) with its health; an engine known only by a latency table
      (no iteration model) cannot be simulated (ValueError).
    - Calls in flight (`calls`: each with its `engine_id`, sent or held in the gateway's queue for
      that engine) are placed on their engines now. Their progress is unknown to the gateway, so
      they start from scratch (not yet admitted, nothing generated): a pessimistic twin that
      overstates the work left by what the engines did since each call was sent. Their output
      length is drawn from the step's fit given the input (the view's output_tokens is max_tokens,
      a cap).
    - Each open workflow continues with its in-flight stage, then stages drawn from the generator
      (a shape whose stages after the current one are taken as the rest); its arrival time, SLO and
      deadline, and the calls' deadlines, are the view's.
    - `slo`: the view's SLO model (the gateway's `ClusterState.slo`); default: built from the engines.
    - `future_queries` new workflows arrive as Poisson at the view's recent rate from now.
    - Forks of the twin (`fork`) draw from `generator` and at the view's recent arrival rate.

    Workflow ids are the twin's own (in-flight workflows first, in the view's order)."""
    if len(engine_configs) != len(view.engines):
        raise ValueError("simulator_from_view: one engine config per view engine")
    for state in view.engines:
        if state.model.perf is None:
            raise ValueError(f"simulator_from_view: engine {state.name} has no iteration model (only a latency "
                             f"table); give it a profile or a catalog GPU and architecture")
    rng = np.random.default_rng([seed, 17])
    now = float(view.now_s)
    by_workflow: dict[int, list[PlacedCallView]] = {}
    for call in calls:
        if call.engine_id < 0:
            raise ValueError(f"simulator_from_view: call {call.call_id} has no engine (engine_id < 0)")
        by_workflow.setdefault(call.workflow_id, []).append(call)
    open_ids = [wid for wid in sorted(by_workflow)]
    shapes = generator.sample(len(open_ids), rng, prompt_segments=prefix_cache)
    specs: list[WorkflowSpec] = []
    for wid, drawn in zip(open_ids, shapes):
        current = by_workflow[wid]
        inputs = np.array([c.input_tokens for c in current], dtype=float)
        outs = conditional_output_tokens(generator, current[0].step, inputs, np.ones(len(current)), rng)
        out_tokens = outs.tolist() if outs is not None else [c.output_tokens for c in current]
        stage = tuple(CallSpec(c.step, c.input_tokens, int(o)) for c, o in zip(current, out_tokens))
        rest = drawn.stages[current[0].stage_index + 1:]
        specs.append(WorkflowSpec((stage, *rest), source=f"twin#{wid}"))
    future = generator.sample(future_queries, rng, prompt_segments=prefix_cache) if future_queries else []
    rate = max(view.recent_arrival_rate_qps, MIN_ARRIVAL_RATE_QPS)
    times = [now] * len(specs) + (now + np.cumsum(rng.exponential(1.0 / rate, size=len(future)))).tolist()
    first_engine = view.engines[0].model
    sim = ClusterSimulator(ClusterConfig(name="twin", engines=list(engine_configs)), specs + future, times,
                           slo_scale, tenants=(Tenant(),), step_tokens=first_engine.step_tokens, policy=policy,
                           prefix_cache=prefix_cache)
    sim.engines = [Engine(i, state.model, cfg, prefix_cache=prefix_cache)
                   for i, (state, cfg) in enumerate(zip(view.engines, engine_configs))]
    for engine, state in zip(sim.engines, view.engines):
        engine.healthy = state.healthy
    if slo is not None:  # the gateway's SLO model (the same rule over the same engine models)
        sim.slo = slo
    # the policy's ticks (interval_s) start from now, not from the twin's time 0
    sim._events = [ev for ev in sim._events if ev[2] != EV_TICK]
    heapq.heapify(sim._events)
    if sim._tick_interval_s:
        sim._push(now + sim._tick_interval_s, EV_TICK, 0, 0)
    # the in-flight workflows arrive now; their current calls go where the gateway sent them
    for index, wid in enumerate(open_ids):
        view_wf = view.workflow(wid)
        placed = by_workflow[wid]
        for k, view_call in enumerate(placed):
            ready = sim.next_decision(until_s=now)
            assert ready is not None and ready.workflow_id == index, "twin arrivals out of order"
            if k == 0:
                wf = sim.workflows[index]
                wf.arrival_time_s, wf.slo_s, wf.deadline_s = view_wf.arrival_time_s, view_wf.slo_s, view_wf.deadline_s
                wf.calls_done = view_wf.calls_done
            ready.ready_time_s = view_call.ready_time_s
            ready.deadline_s = view_call.deadline_s
            ready.workflow_deadline_s = view_call.workflow_deadline_s
            ready.priority = view_call.priority
            sim.dispatch(ready, view_call.engine_id)
    if sim.now_s < now:  # nothing in flight: the twin's clock still has to reach the view's
        assert sim.next_decision(until_s=now) is None
    sim._recent_arrivals = arrival_window_at_rate(view.recent_arrival_rate_qps, now)
    _remember_generator(sim._specs, generator)
    return sim
