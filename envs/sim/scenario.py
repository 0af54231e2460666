"""One simulation run described as data: workload, cluster, load, SLO, seed. Used by
`agentsched simulate`, the benchmark harness and the Gymnasium envs."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from envs.sim.cluster import ClusterSimulator, Failure, Tenant
from envs.sim.config import ClusterConfig, load_cluster
from envs.sim.metrics import records_from_simulator, summarize
from envs.sim.workload import (
    ArrivalProcess,
    GammaArrivals,
    PoissonArrivals,
    TraceGenerator,
    WorkflowSpec,
    WorkflowTemplate,
    draw_workflows,
    load_trace,
    resolve_trace_path,
    resolve_workflow_path,
    step_mean_tokens,
)


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("default", min_length=1)
    slo_scale: PositiveFloat = 1.0
    priority: int = 0
    share: PositiveFloat = 1.0


class FailureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engine: int = Field(ge=0)
    at_s: float = Field(ge=0.0)
    duration_s: PositiveFloat


class RunSpec(BaseModel):
    """A fully specified simulation run."""

    model_config = ConfigDict(extra="forbid")
    trace: str = "chess_trace1"
    cluster: str | ClusterConfig = "paper"
    rate_qps: PositiveFloat = 0.5
    slo_scale: PositiveFloat = 3.0
    seed: int = 0
    queries: PositiveInt | None = None  # default: the whole trace; more draws from the fitted generator
    generated: bool = False  # every query from the generator fitted to the trace (needs `queries`)
    arrivals: ArrivalProcess | None = Field(None, discriminator="kind")  # default: Poisson at rate_qps
    burstiness_cv: PositiveFloat = 1.0  # >1: Gamma arrivals with this CV (when `arrivals` is not given)
    tenants: list[TenantSpec] = [TenantSpec()]
    failures: list[FailureSpec] = []
    # vLLM's automatic prefix caching on every engine (on by default, as in vLLM V1)
    prefix_cache: bool = True

    def cluster_config(self) -> ClusterConfig:
        return self.cluster if isinstance(self.cluster, ClusterConfig) else load_cluster(self.cluster)

    def arrival_process(self) -> ArrivalProcess:
        if self.arrivals is not None:
            return self.arrivals
        if self.burstiness_cv != 1.0:
            return GammaArrivals(rate_qps=self.rate_qps, cv=self.burstiness_cv)
        return PoissonArrivals(rate_qps=self.rate_qps)


@lru_cache(maxsize=16)
def _trace(path: str) -> tuple[WorkflowSpec, ...]:
    return tuple(load_trace(path))


@lru_cache(maxsize=16)
def _generator(path: str) -> TraceGenerator:
    return TraceGenerator.fit(_trace(path), name=f"gen({path.rsplit('/', 1)[-1]})")


DEFAULT_TEMPLATE_QUERIES = 100  # queries drawn from a YAML workflow template when --queries is not given


def is_template(trace: str) -> bool:
    return trace.endswith((".yaml", ".yml"))


@lru_cache(maxsize=16)
def _template(path: str) -> WorkflowTemplate:
    return WorkflowTemplate.load(path)


def workload_for(spec: RunSpec) -> tuple[list[WorkflowSpec], np.ndarray]:
    """Workflows and arrival times of a run; seeded, independent streams for each. `trace` is a
    CHESS trace (replayed, then extended by its fitted generator) or a YAML workflow template."""
    wf_rng = np.random.default_rng([spec.seed, 1])
    arr_rng = np.random.default_rng([spec.seed, 2])
    if is_template(spec.trace):
        workflows = _template(str(resolve_workflow_path(spec.trace))).sample(spec.queries or DEFAULT_TEMPLATE_QUERIES, wf_rng)
        return workflows, spec.arrival_process().times(len(workflows), arr_rng)
    path = str(resolve_trace_path(spec.trace))
    trace = _trace(path)
    if spec.generated:
        workflows = _generator(path).sample(spec.queries or len(trace), wf_rng, spec.prefix_cache)
    else:
        workflows = draw_workflows(trace, spec.queries, wf_rng,
                                   _generator(path) if spec.queries and spec.queries > len(trace) else None,
                                   spec.prefix_cache)
    times = spec.arrival_process().times(len(workflows), arr_rng)
    return workflows, times


@lru_cache(maxsize=16)
def _trace_step_tokens(path: str) -> dict[str, tuple[float, float]]:
    """Per-step mean tokens of a trace: computed once (envs build a simulator per episode); the
    simulator only reads it."""
    return step_mean_tokens(_trace(path))


def build_simulator(spec: RunSpec, queue_key: Callable | None = None, record_timeline: bool = False,
                    **kwargs: Any) -> ClusterSimulator:
    workflows, times = workload_for(spec)
    if is_template(spec.trace):
        # what a scheduler may know in advance: the template's mean tokens per step; the standard
        # workflow of the SLO rule is the template's own stage sequence
        template = _template(str(resolve_workflow_path(spec.trace)))
        step_tokens = step_mean_tokens(template.sample(200, np.random.default_rng(0)))
        kwargs.setdefault("standard", [stage.step for stage in template.stages for _ in range(stage.fanout)])
    else:
        step_tokens = _trace_step_tokens(str(resolve_trace_path(spec.trace)))
    return ClusterSimulator(
        spec.cluster_config(), workflows, times, spec.slo_scale, queue_key=queue_key,
        tenants=[Tenant(t.name, t.slo_scale, t.priority, t.share) for t in spec.tenants],
        failures=[Failure(f.engine, f.at_s, f.duration_s) for f in spec.failures],
        step_tokens=step_tokens, tenant_seed=spec.seed, record_timeline=record_timeline,
        prefix_cache=spec.prefix_cache, arrival_model=spec.arrival_process(), **kwargs)


def simulate(spec: RunSpec, policy: Any, record_timeline: bool = False) -> tuple[dict[str, Any], ClusterSimulator]:
    """Run `policy` on `spec`; the result dict of `agentsched simulate` and the finished simulator."""
    policy.reset()
    sim = build_simulator(spec, record_timeline=record_timeline, policy=policy)
    sim.run()
    wfs, calls, engines = records_from_simulator(sim)
    result = summarize(wfs, calls, engines, sim_wall_s=sim.wall_s,
                       extra={"policy": policy.spec(), "rate_qps": spec.rate_qps, "slo_scale": spec.slo_scale,
                              "seed": spec.seed, "trace": spec.trace,
                              "cluster": spec.cluster if isinstance(spec.cluster, str) else spec.cluster.name,
                              "base_slo_s": sim.slo.base_slo_s, "decisions": sim.decisions,
                              "prefix_cache": "on" if spec.prefix_cache else "off"})
    return result, sim
