"""The read-only cluster-state view: the one contract between schedulers and the world.

The simulator, the Gymnasium envs and the deploy gateway all hand policies objects that satisfy
these protocols, built from one model of engines and load (`envs.sim.model`); a policy that only reads them runs unchanged in simulation and against live vLLM
engines. The simulator passes its own live objects (no copies, for speed), so policies must treat
everything here as read-only.

Times are seconds on the owner's clock (simulated time, or the gateway's monotonic clock).
"""

from __future__ import annotations

from typing import Hashable, Protocol, Sequence, runtime_checkable


@runtime_checkable
class CallView(Protocol):
    """One LLM call that is ready (its stage's predecessors finished) or already placed."""

    call_id: int
    workflow_id: int
    tenant: str
    step: str  # normalised CHESS step name, e.g. "generate_candidate"
    stage_index: int  # position of the call's stage inside its workflow
    fanout: int  # calls in the same stage (siblings + itself)
    input_tokens: int
    output_tokens: int  # requested max tokens (the simulator knows the true length; a gateway knows max_tokens)
    ready_time_s: float  # when the call became ready for dispatch
    deadline_s: float  # absolute deadline: the paper's proportional slice of the workflow's remaining budget
    workflow_deadline_s: float  # the workflow's end-to-end deadline (arrival + SLO)
    priority: int  # tenant priority, lower is more important

    @property
    def segments(self) -> Sequence[tuple[Hashable, int]]:
        """The prompt as (chain key, tokens) segments in order, covering input_tokens; a chain key
        names the whole text from the prompt's first token to the segment's end (like vLLM's block
        hashes: equal keys, equal prefixes). Empty when the prompt structure is unknown. A property
        (read-only), so an owner's tuple of its own key type satisfies it."""
        ...


@runtime_checkable
class EngineView(Protocol):
    """One serving engine (a vLLM instance): a model on a GPU type with a TP degree."""

    engine_id: int  # index in ClusterView.engines
    name: str
    gpu: str  # GPU type name from the catalog, e.g. "A100-80G"
    healthy: bool
    price_per_hour: float
    max_num_seqs: int
    kv_capacity_tokens: int  # tokens of KV cache (the engine's own figure once scraped); a call fits if its context does

    # load figures are read-only properties: an owner may compute them (the simulator's Engine does)
    @property
    def num_running(self) -> int:
        """Sequences in the running batch."""
        ...

    @property
    def num_waiting(self) -> int:
        """Calls queued at the engine, not yet admitted."""
        ...

    @property
    def kv_usage(self) -> float:
        """Share of KV-cache blocks in use, 0..1."""
        ...

    @property
    def outstanding_work_s(self) -> float:
        """Expected solo seconds of calls placed here and not yet finished."""
        ...

    @property
    def assigned_work_s(self) -> float:
        """Cumulative expected solo seconds ever placed here (the paper's W_e)."""
        ...

    @property
    def assigned_calls(self) -> int:
        """Cumulative calls ever placed here."""
        ...

    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens of prompt prefixes held in the engine's prefix cache (0: none or off)."""
        ...

    def expected_latency_s(self, step: str) -> float:
        """Expected latency of one call of `step` alone on this engine (the paper's T_e(s))."""
        ...

    def cached_prefix_tokens(self, call: CallView) -> int:
        """Prompt tokens of `call` this engine would serve from its prefix cache if it took the call
        now (full blocks of the longest cached prefix; 0 without a cache or without segments)."""
        ...

    def expected_call_latency_s(self, call: CallView) -> float:
        """Expected latency of `call` alone on this engine given those cache hits: only the prefill
        it must compute here counts (equals expected_latency_s(call.step) without hits)."""
        ...


@runtime_checkable
class WorkflowView(Protocol):
    workflow_id: int
    tenant: str
    arrival_time_s: float
    slo_s: float
    deadline_s: float  # arrival + SLO
    calls_done: int
    expected_remaining_s: float  # expected solo seconds of the standard workflow still ahead
    # engine seconds of its finished calls (each call: finish - admission), Autellix's attained service
    attained_service_s: float
    # the same along the critical path of its DAG: a call records the workflow's value when it becomes
    # ready; when it finishes the value becomes max(value, recorded + the call's service) (Autellix ATLAS)
    critical_path_service_s: float

    @property
    def done(self) -> bool: ...


@runtime_checkable
class ClusterView(Protocol):
    now_s: float
    finished_workflows: int
    met_workflows: int

    # read-only properties, so an owner's list of its own engine/workflow type satisfies them
    # (a mutable attribute would have to be exactly Sequence[EngineView])
    @property
    def engines(self) -> Sequence[EngineView]: ...

    @property
    def workflows(self) -> Sequence[WorkflowView]:
        """Every workflow that has arrived, in arrival order (knob policies read load and slack from it)."""
        ...

    def workflow(self, workflow_id: int) -> WorkflowView: ...

    @property
    def recent_arrival_rate_qps(self) -> float: ...

    @property
    def slo_attainment_so_far(self) -> float: ...


@runtime_checkable
class SchedulingPolicy(Protocol):
    """What the simulator asks of a policy (`policies.base.Policy` provides it): whether to keep
    a ready call's workflow admitted (or defer it), the engine for the call, an engine's admission
    order, and an optional periodic hook."""

    interval_s: float | None

    def admit(self, call: CallView, cluster: ClusterView) -> bool: ...

    def dispatch(self, call: CallView, cluster: ClusterView) -> int: ...

    def queue_key(self, call: CallView, engine: EngineView) -> float: ...

    def on_interval(self, cluster: ClusterView) -> None: ...
