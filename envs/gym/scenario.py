"""`Scenario`: the distribution of episodes an env draws from, as validated data (YAML-loadable).

A scenario fixes the workload source (a CHESS trace replayed in order, or fresh queries from the
generator fitted to it), the cluster, the arrival process and its load, the SLO scale, tenants,
episode length and the seeds episodes are drawn from. With `randomize` set, each episode draws
load, burstiness, SLO scale and cluster from ranges (domain randomisation), so a policy can be
trained across loads and clusters and tested on others.

Every episode is fully described by a `RunSpec` (`Scenario.run_spec(episode_seed)`): evaluation
code runs heuristics on exactly the env's episodes with `envs.sim.scenario.simulate(spec, policy)`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from envs.sim.cells import shaped_arrivals
from envs.sim.config import ClusterConfig, EngineConfig, load_cluster
from envs.sim.errors import UserError
from envs.sim.scenario import FailureSpec, RunSpec, TenantSpec, is_template
from envs.sim.workload import GammaArrivals, PiecewiseArrivals, PoissonArrivals, resolve_trace_path, resolve_workflow_path

# Episode seeds are drawn below this bound when a scenario does not limit them (fits int32).
MAX_EPISODE_SEED = 2**31 - 1
# Stream id of the scenario's own draws (load, SLO, cluster) in `np.random.default_rng([seed, id])`;
# the workload and the arrivals use streams 1 and 2 (envs.sim.scenario.workload_for).
SCENARIO_RNG_STREAM = 7
# Diurnal arrivals are built from this many constant-rate steps per period.
DIURNAL_STEPS = 24
# Arrival processes a scenario can draw; "step" and "burst" are the evaluation cells' load shapes.
ArrivalKind = Literal["poisson", "gamma", "diurnal", "step", "burst"]
# Scenarios shipped with the package, loadable by name (`Scenario.coerce("train-randomized")`).
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

Range = tuple[float, float]


def _check_range(name: str, value: Range, positive: bool = True) -> Range:
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or (positive and lo <= 0):
        need = "0 < low <= high" if positive else "low <= high"
        raise ValueError(f"{name} must be [low, high] with {need}, got {list(value)}")
    return (float(lo), float(hi))


@lru_cache(maxsize=64)
def _shipped_cluster(name: str) -> ClusterConfig:
    return load_cluster(name)


def resolve_cluster(cluster: str | ClusterConfig) -> ClusterConfig:
    return cluster if isinstance(cluster, ClusterConfig) else _shipped_cluster(cluster)


class RandomClusterSpec(BaseModel):
    """A random cluster: `engines` engines (uniform in the range), each of a type drawn uniformly
    from `engine_types` (their `count` is ignored). All types must serve the same model."""

    model_config = ConfigDict(extra="forbid")
    engine_types: list[EngineConfig] = Field(
        default_factory=lambda: [EngineConfig(gpu=g, model="Llama-3.1-70B", weight_bits=4)
                                 for g in ("A100-80G", "H100", "L40S", "A6000")],
        min_length=1)
    engines: tuple[PositiveInt, PositiveInt] = (2, 8)

    @field_validator("engines")
    @classmethod
    def _engines_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] > v[1]:
            raise ValueError(f"engines must be [min, max] with min <= max, got {list(v)}")
        return v

    @field_validator("engine_types")
    @classmethod
    def _one_model(cls, v: list[EngineConfig]) -> list[EngineConfig]:
        models = {e.model for e in v}
        if len(models) > 1:
            raise ValueError(f"all engine types must serve the same model, got {sorted(models)}")
        return v

    def sample(self, rng: np.random.Generator, name: str) -> ClusterConfig:
        n = int(rng.integers(self.engines[0], self.engines[1] + 1))
        picks = rng.integers(len(self.engine_types), size=n)
        counts = np.bincount(picks, minlength=len(self.engine_types))
        # grouped by type, in the order of `engine_types`, so engine indices are stable per type
        engines = [t.model_copy(update={"count": int(c)}) for t, c in zip(self.engine_types, counts) if c > 0]
        return ClusterConfig(name=name, engines=engines)


class Randomization(BaseModel):
    """Domain randomisation: per episode, draw what is given here instead of the scenario's
    nominal value. Rates are drawn log-uniformly (load matters multiplicatively), the rest
    uniformly. Leave a field `None` to keep the nominal value."""

    model_config = ConfigDict(extra="forbid")
    rate_qps: Range | None = (0.02, 0.3)
    slo_scale: Range | None = (1.5, 6.0)
    burstiness_cv: Range | None = (1.0, 3.0)  # used when arrivals is "gamma"
    arrivals: list[ArrivalKind] | None = None  # drawn uniformly
    clusters: list[str | ClusterConfig] | None = None  # drawn uniformly (ignored if random_cluster)
    random_cluster: RandomClusterSpec | None = None

    @field_validator("rate_qps", "slo_scale", "burstiness_cv")
    @classmethod
    def _ranges(cls, v: Range | None, info) -> Range | None:
        return None if v is None else _check_range(info.field_name, v)

    @field_validator("arrivals", "clusters")
    @classmethod
    def _non_empty(cls, v: list | None, info) -> list | None:
        if v is not None and not v:
            raise ValueError(f"{info.field_name} must list at least one choice (or be left out)")
        return v


class Scenario(BaseModel):
    """What episodes look like. Nominal values are used unless `randomize` is set."""

    model_config = ConfigDict(extra="forbid")
    name: str = "default"
    # -- workload
    trace: str = "chess_trace1"
    # "trace": the trace's first `queries` queries in order (the fitted generator continues past its
    # end); "generator": every query fresh from the generator fitted to the trace
    workload: Literal["trace", "generator"] = "trace"
    queries: PositiveInt = 40  # workflows per episode
    # -- cluster
    cluster: str | ClusterConfig = "paper"
    # -- load
    # "step" / "burst": the evaluation cells' shifting loads (envs.sim.cells) at mean rate `rate_qps`
    arrivals: ArrivalKind = "poisson"
    rate_qps: PositiveFloat = 0.05
    burstiness_cv: PositiveFloat = 2.0  # CV of inter-arrival times, for "gamma"
    diurnal_amplitude: float = Field(0.8, ge=0.0, le=1.0)  # rate swings by +-amplitude x mean
    diurnal_period_s: PositiveFloat = 1800.0
    slo_scale: PositiveFloat = 3.0
    tenants: list[TenantSpec] = Field(default_factory=lambda: [TenantSpec()], min_length=1)
    failures: list[FailureSpec] = []  # engines beyond a (random) cluster's size are skipped
    # -- episode
    horizon_s: PositiveFloat | None = None  # truncate at this simulated time; None: run to completion
    # Dispatch-v0 pads to this many engines (None: the largest cluster the scenario can draw). Give
    # train and test scenarios the same value so one policy fits both.
    pad_to_engines: PositiveInt | None = None
    # -- seeds: episode seeds are seed_base + k, k uniform in [0, seed_count) (unbounded if None)
    seed_base: int = Field(0, ge=0)
    seed_count: PositiveInt | None = None
    # -- domain randomisation (off when None)
    randomize: Randomization | None = None
    # -- engines: vLLM's automatic prefix caching (on by default, as in vLLM V1)
    prefix_cache: bool = True

    @field_validator("trace")
    @classmethod
    def _trace_exists(cls, v: str) -> str:
        try:
            resolve_workflow_path(v) if is_template(v) else resolve_trace_path(v)
        except UserError as exc:
            raise ValueError(str(exc).removeprefix("trace: ")) from None
        return v

    @field_validator("cluster")
    @classmethod
    def _cluster_exists(cls, v: str | ClusterConfig) -> str | ClusterConfig:
        try:
            resolve_cluster(v)
        except UserError as exc:
            raise ValueError(str(exc).removeprefix("cluster: ")) from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        if self.randomize is not None and self.randomize.clusters:
            for i, c in enumerate(self.randomize.clusters):
                try:
                    self._cluster_exists(c)
                except ValueError as exc:
                    raise ValueError(f"randomize.clusters[{i}]: {exc}") from None
        if self.seed_count is not None and self.seed_base + self.seed_count > MAX_EPISODE_SEED:
            raise ValueError(f"seed_base + seed_count must stay below {MAX_EPISODE_SEED}")
        if self.pad_to_engines is not None and self.pad_to_engines < self.largest_cluster():
            raise ValueError(f"pad_to_engines: {self.pad_to_engines} is smaller than the largest cluster this "
                             f"scenario can draw ({self.largest_cluster()} engines)")
        return self

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Scenario":
        """A scenario YAML file, or the name of a shipped one; errors name the field to fix."""
        path = Path(path)
        if not path.is_file() and (SCENARIO_DIR / f"{path}.yaml").is_file():
            path = SCENARIO_DIR / f"{path}.yaml"
        elif not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")))
            raise UserError(f"scenario: {path} is neither a file nor a shipped scenario (shipped: {shipped})")
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise UserError(f"scenario: file {path} not found (check the path)") from None
        except yaml.YAMLError as exc:
            raise UserError(f"scenario: {path} is not valid YAML ({exc.__class__.__name__})") from None
        try:
            return cls.model_validate(raw or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "scenario"
            raise UserError(f"scenario: {path.name}: {loc}: {err['msg']} (fix this field)") from None

    @classmethod
    def coerce(cls, value: "Scenario | dict | str | Path | None") -> "Scenario":
        """A Scenario from itself, a dict, a YAML path, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, Scenario):
            return value
        if isinstance(value, dict):
            return cls.model_validate(value)
        return cls.load(value)

    # ---- episodes ------------------------------------------------------------------------------
    def evaluation_seeds(self, n: int) -> list[int]:
        """The first `n` episode seeds of the scenario's range (a fixed evaluation set): run them in
        the env with `reset(options={"episode_seed": s})` and in `simulate` with `run_spec(s)`."""
        if self.seed_count is not None and n > self.seed_count:
            raise ValueError(f"the scenario has only {self.seed_count} episode seeds, asked for {n}")
        return [self.seed_base + i for i in range(n)]

    def draw_episode_seed(self, rng: np.random.Generator) -> int:
        return self.seed_base + int(rng.integers(self.seed_count or (MAX_EPISODE_SEED - self.seed_base)))

    def possible_clusters(self) -> list[ClusterConfig] | None:
        """Every cluster an episode can get, or None for random clusters."""
        r = self.randomize
        if r is not None and r.random_cluster is not None:
            return None
        if r is not None and r.clusters:
            return [resolve_cluster(c) for c in r.clusters]
        return [resolve_cluster(self.cluster)]

    def max_engines(self) -> int:
        """How many engines Dispatch-v0 pads to by default: `pad_to_engines`, or the largest cluster
        the scenario can draw."""
        return self.pad_to_engines or self.largest_cluster()

    def largest_cluster(self) -> int:
        """The largest cluster any episode can have."""
        clusters = self.possible_clusters()
        if clusters is None:
            return self.randomize.random_cluster.engines[1]
        return max(len(c.expanded()) for c in clusters)

    def run_spec(self, seed: int) -> RunSpec:
        """The episode with this seed, as a `RunSpec` that `envs.sim.scenario.simulate` runs."""
        rng = np.random.default_rng([seed, SCENARIO_RNG_STREAM])
        r = self.randomize
        rate, slo, cv, arrivals = self.rate_qps, self.slo_scale, self.burstiness_cv, self.arrivals
        cluster: str | ClusterConfig = self.cluster
        if r is not None:
            # always draw in the same order so one field's range does not shift another's draw
            u = rng.random(4)
            if r.rate_qps is not None:
                lo, hi = r.rate_qps
                rate = math.exp(math.log(lo) + u[0] * (math.log(hi) - math.log(lo)))
            if r.slo_scale is not None:
                slo = r.slo_scale[0] + u[1] * (r.slo_scale[1] - r.slo_scale[0])
            if r.burstiness_cv is not None:
                cv = r.burstiness_cv[0] + u[2] * (r.burstiness_cv[1] - r.burstiness_cv[0])
            if r.arrivals is not None:
                arrivals = r.arrivals[min(int(u[3] * len(r.arrivals)), len(r.arrivals) - 1)]
            if r.random_cluster is not None:
                cluster = r.random_cluster.sample(rng, name=f"random-{seed}")
            elif r.clusters:
                cluster = r.clusters[int(rng.integers(len(r.clusters)))]
        n_engines = len(resolve_cluster(cluster).expanded())
        if arrivals == "gamma":
            process = GammaArrivals(rate_qps=rate, cv=cv)
        elif arrivals == "diurnal":
            process = PiecewiseArrivals.diurnal(rate, self.diurnal_amplitude, self.diurnal_period_s, DIURNAL_STEPS)
        elif arrivals in ("step", "burst"):
            process = shaped_arrivals(arrivals, rate, self.queries)
        else:
            process = PoissonArrivals(rate_qps=rate)
        return RunSpec(
            trace=self.trace, cluster=cluster, rate_qps=rate, slo_scale=slo, seed=seed,
            queries=self.queries, arrivals=process, burstiness_cv=cv if arrivals == "gamma" else 1.0,
            tenants=self.tenants, failures=[f for f in self.failures if f.engine < n_engines],
            generated=self.workload == "generator", prefix_cache=self.prefix_cache)
