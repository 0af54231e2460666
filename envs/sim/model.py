"""The one model of engines and load that the simulator and the deploy gateway both build.

Everything a policy can read about an engine that does not change while it runs (expected latency
of each step, KV capacity, batch limits, price, its type for the SLO rule) is an `EngineModel`,
built by `build_engine_model` from an `EngineConfig` and a `StepTokens` table. The simulator's
`Engine` and the gateway's `EngineState` each hold one and read it; neither computes these values
itself. The same goes for the work accounting behind `outstanding_work_s`/`assigned_work_s`
(`WorkLedger`), the SLO grouping of engine types (`cluster_slo_model`) and the recent arrival
rate (`ArrivalWindow`).

The simulator feeds these with simulated events; the gateway with live ones (a call sent, a call
finished, a scrape of the engine's /metrics). A test builds both views of one cluster and checks
that every view field and observation agrees.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from envs.sim.catalog import Catalog, load_catalog
from envs.sim.config import DEFAULT_BLOCK_SIZE_TOKENS, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, EngineConfig
from envs.sim.errors import UserError
from envs.sim.perf import IterationModel, PerfProfile, ProfileModel, RooflineModel, solo_call_latency_s
from envs.sim.slo import REFERENCE_PATH, SLOModel, standard_workflow

GB = 1e9
# `recent_arrival_rate_qps` counts the workflows that arrived within this many seconds
ARRIVAL_RATE_WINDOW_S = 60.0
# entries of an engine model's memo of expected latencies with cache hits (a bound on memory)
HITS_CACHE_ENTRIES = 1 << 16

__all__ = [
    "ARRIVAL_RATE_WINDOW_S", "DEFAULT_BLOCK_SIZE_TOKENS", "DEFAULT_MAX_NUM_BATCHED_TOKENS", "DEFAULT_MAX_NUM_SEQS",
    "ArrivalWindow", "EngineModel", "EngineType", "LedgerMixin", "StepTokens", "WorkLedger",
    "build_engine_model", "cluster_slo_model", "reference_latency_table",
]


class StepTokens:
    """Mean (input, output) tokens per step: what a scheduler may know about a step in advance.

    A step it has never seen gets the mean over the steps it knows (one rule for the simulator and
    the gateway); an empty table knows nothing and gives `FALLBACK_TOKENS`.
    """

    FALLBACK_TOKENS = (1000.0, 100.0)

    def __init__(self, means: Mapping[str, tuple[float, float]]):
        self.means = {step: (float(i), float(o)) for step, (i, o) in means.items()}
        if self.means:
            n = len(self.means)
            self.default = (sum(i for i, _ in self.means.values()) / n, sum(o for _, o in self.means.values()) / n)
        else:
            self.default = self.FALLBACK_TOKENS

    def of(self, step: str) -> tuple[float, float]:
        return self.means.get(step, self.default)

    def steps(self) -> list[str]:
        return list(self.means)

    @classmethod
    def from_reference(cls, token_scale: float = 1.0) -> "StepTokens":
        """The CHESS stage means of the reference table, scaled as a replay scales its prompts."""
        with open(REFERENCE_PATH) as handle:
            ref = json.load(handle)["stage_mean_tokens"]
        return cls({step: (max(1, round(t["input_tokens"] * token_scale)), max(1, round(t["output_tokens"] * token_scale)))
                    for step, t in ref.items()})


@dataclass(frozen=True)
class EngineType:
    """What makes two engines the same type for the paper's SLO rule (averaged over distinct types)."""

    gpu: str
    tp: int
    weight_bits: int
    profile: str | None


class EngineModel:
    """The static facts of one engine, and its expected solo latency per step (the paper's T_e(s)).

    Latencies come from the iteration model (a roofline of the catalog GPU and model, or a measured
    profile) at the step's mean tokens, plus the per-call times a profile measured; or, where no
    model is known (a GPU engine named only by its type in a deploy file), from a latency table.
    """

    __slots__ = ("name", "gpu", "engine_type", "price_per_hour", "perf", "step_tokens", "latency_table",
                 "request_overhead_s", "call_engine_s", "call_frontend_s", "idle_wake_s", "idle_wake_tau_s", "max_num_seqs", "max_num_batched_tokens",
                 "block_size_tokens", "kv_capacity_tokens", "_latency_cache", "_decode_cache", "_hits_cache")

    def __init__(self, *, name: str, gpu: str, engine_type: EngineType, price_per_hour: float,
                 perf: IterationModel | None, step_tokens: StepTokens, max_num_seqs: int, max_num_batched_tokens: int,
                 block_size_tokens: int, kv_capacity_tokens: int, request_overhead_s: float = 0.0,
                 call_engine_s: float = 0.0, call_frontend_s: float = 0.0,
                 idle_wake_s: float = 0.0, idle_wake_tau_s: float = 0.03,
                 latency_table: Mapping[str, float] | None = None):
        if perf is None and not latency_table:
            raise ValueError("an engine model needs an iteration model or a latency table")
        self.name = name
        self.gpu = gpu
        self.engine_type = engine_type
        self.price_per_hour = price_per_hour
        self.perf = perf
        self.step_tokens = step_tokens
        self.latency_table = dict(latency_table) if latency_table else None
        self.request_overhead_s = request_overhead_s
        self.call_engine_s = call_engine_s
        self.call_frontend_s = call_frontend_s
        self.idle_wake_s = idle_wake_s  # see PerfProfile.idle_wake_s
        self.idle_wake_tau_s = idle_wake_tau_s
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size_tokens = block_size_tokens
        self.kv_capacity_tokens = kv_capacity_tokens
        self._latency_cache: dict[str, float] = {}
        self._decode_cache: dict[str, float] = {}
        # (step, input tokens, hit tokens) -> expected latency with hits: a pure function of the
        # engine's model, asked on every dispatch; bounded (cleared when full)
        self._hits_cache: dict[tuple[str, int, int], float] = {}

    def share_memos(self, twin: "EngineModel") -> None:
        """Use `twin`'s memos of expected latencies: `twin` is the model of an engine configured
        exactly like this one but for its name (so every latency is the same), e.g. one of a
        cluster's `count` engines of a type. Cache-aware dispatch asks these on every call."""
        self._latency_cache = twin._latency_cache
        self._decode_cache = twin._decode_cache
        self._hits_cache = twin._hits_cache

    @property
    def solo_overhead_s(self) -> float:
        """What a call alone on the engine pays besides its iterations (see PerfProfile.solo_overhead_s)."""
        return self.request_overhead_s + self.call_engine_s + self.call_frontend_s

    def expected_latency_s(self, step: str) -> float:
        cached = self._latency_cache.get(step)
        if cached is None:
            table = self.latency_table
            if table is not None:
                cached = table[step] if step in table else sum(table.values()) / len(table)
            else:
                assert self.perf is not None
                mean_in, mean_out = self.step_tokens.of(step)
                cached = self.solo_overhead_s + solo_call_latency_s(
                    self.perf, int(round(mean_in)), max(1, int(round(mean_out))), self.max_num_batched_tokens)
            self._latency_cache[step] = cached
        return cached

    def expected_latency_with_hits_s(self, step: str, input_tokens: int, hit_tokens: int) -> float:
        """Expected latency of a call of `step` with this prompt alone on the engine when its first
        `hit_tokens` are served from the prefix cache: T_e(s) scaled by the share of this prompt's
        solo time left when the cached prefix is not prefilled (T_e(s) itself without hits)."""
        key = (step, input_tokens, hit_tokens)
        known = self._hits_cache.get(key)
        if known is not None:
            return known
        expected = self.expected_latency_s(step)
        if hit_tokens <= 0 or self.perf is None:
            return expected  # a latency table knows no prefill to skip
        perf = self.perf
        decode_s = self._decode_cache.get(step)
        if decode_s is None:
            mean_in, mean_out = self.step_tokens.of(step)
            out = max(1, int(round(mean_out)))
            decode_s = perf.decode_segment(1, int(round(mean_in)) + 1).total_s(out - 1) if out > 1 else 0.0
            self._decode_cache[step] = decode_s
        n = self.max_num_batched_tokens
        if input_tokens <= n:  # a prompt that fits one chunk is one iteration
            rest = input_tokens - hit_tokens
            cold = perf.iteration_s(input_tokens, input_tokens, input_tokens * (input_tokens + 1) * 0.5, 0, 0)
            warm = perf.iteration_s(rest, input_tokens, rest * (hit_tokens + (rest + 1) * 0.5), 0, 0)
        else:
            cold = solo_call_latency_s(perf, input_tokens, 1, n)
            warm = solo_call_latency_s(perf, input_tokens, 1, n, cached_tokens=hit_tokens)
        value = expected * (warm + decode_s) / (cold + decode_s)
        if len(self._hits_cache) >= HITS_CACHE_ENTRIES:
            self._hits_cache.clear()
        self._hits_cache[key] = value
        return value

    def latency_by_step(self, steps: Iterable[str]) -> dict[str, float]:
        return {step: self.expected_latency_s(step) for step in steps}

    def fits(self, tokens: int) -> bool:
        """Whether a call with this many tokens of context can ever fit in the engine's KV cache."""
        return tokens <= self.kv_capacity_tokens


def reference_latency_table(gpu: str) -> dict[str, float] | None:
    """The paper's measured solo latency per step on a GPU type, or None if it was not measured."""
    with open(REFERENCE_PATH) as handle:
        return json.load(handle)["latency_s"].get(gpu)


def build_engine_model(config: EngineConfig, step_tokens: StepTokens, catalog: Catalog | None = None,
                       latency_table: Mapping[str, float] | None = None,
                       kv_capacity_tokens: int | None = None) -> EngineModel:
    """The engine model of one configured engine.

    With a `profile`, the measured profile replaces the roofline and gives the per-call times and,
    where it recorded them, the engine's limits and KV capacity; the catalog is then only asked
    for what the profile and the config leave open (price, memory-derived KV capacity). A
    `latency_table` (per-step seconds) overrides expected latencies, for engines known only by
    measured step latencies; `kv_capacity_tokens` overrides the KV capacity where neither the
    profile nor the catalog can tell it.
    """
    catalog = catalog or load_catalog()
    profile = PerfProfile.load(config.profile) if config.profile else None
    name = config.name or config.gpu

    def gpu_spec():
        return catalog.gpu(config.gpu)

    perf: IterationModel | None
    if profile is not None:
        perf = ProfileModel(profile)
    elif latency_table:
        perf = None
    else:
        perf = RooflineModel(gpu_spec(), catalog.model(config.model), config.tp, config.weight_bits, config.kv_bits)
    max_num_seqs = profile.max_num_seqs if profile and profile.max_num_seqs else config.max_num_seqs
    batched = (profile.max_num_batched_tokens if profile and profile.max_num_batched_tokens
               else config.max_num_batched_tokens)
    block = profile.block_size_tokens if profile and profile.block_size_tokens else config.block_size_tokens
    if kv_capacity_tokens is not None:
        kv_tokens = kv_capacity_tokens
    elif profile and profile.kv_capacity_tokens:
        kv_tokens = profile.kv_capacity_tokens
    else:
        gpu, model = gpu_spec(), catalog.model(config.model)
        usable = gpu.memory_gb * GB * config.gpu_memory_utilization * config.tp
        weights = model.parameters * config.weight_bits / 8.0
        reserve = config.activation_reserve_gb * GB * config.tp
        kv_tokens = int((usable - weights - reserve) / model.kv_bytes_per_token(config.kv_bits))
        if kv_tokens < batched:
            raise UserError(
                f"engines: {model.name} with {config.weight_bits}-bit weights leaves room for only {max(kv_tokens, 0)} KV "
                f"tokens on {gpu.name} x tp{config.tp} (need at least max_num_batched_tokens={batched}); "
                f"raise tp, lower weight_bits or raise gpu_memory_utilization")
    if kv_tokens < batched:
        raise UserError(f"engines: {name}: profile kv_capacity_tokens={kv_tokens} is below max_num_batched_tokens="
                        f"{batched}; re-run `agentsched calibrate` or lower max_num_batched_tokens")
    price = config.price_per_hour if config.price_per_hour is not None else gpu_spec().price_per_hour * config.tp
    return EngineModel(
        name=name, gpu=config.gpu, engine_type=EngineType(config.gpu, config.tp, config.weight_bits, config.profile),
        price_per_hour=price, perf=perf, step_tokens=step_tokens, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=batched, block_size_tokens=block,
        kv_capacity_tokens=max(0, kv_tokens // block) * block,
        request_overhead_s=profile.request_overhead_s if profile else 0.0,
        call_engine_s=profile.call_engine_s if profile else 0.0,
        call_frontend_s=profile.call_frontend_s if profile else 0.0,
        idle_wake_s=profile.idle_wake_s if profile else 0.0,
        idle_wake_tau_s=profile.idle_wake_tau_s if profile else 0.03,
        latency_table=latency_table)


def cluster_slo_model(models: Sequence[EngineModel], steps: Iterable[str],
                      standard: Sequence[str] | None = None) -> SLOModel:
    """The paper's SLO model: each step's expected latency averaged over the distinct engine types."""
    by_type: dict[EngineType, EngineModel] = {}
    for model in models:
        by_type.setdefault(model.engine_type, model)
    steps = list(steps)
    return SLOModel.from_engine_latencies([m.latency_by_step(steps) for m in by_type.values()],
                                          standard if standard is not None else standard_workflow())


class WorkLedger:
    """The expected-work accounting of one engine behind `outstanding_work_s` (placed, not yet
    finished) and `assigned_work_s` / `assigned_calls` (ever placed: the paper's W_e)."""

    __slots__ = ("outstanding_work_s", "assigned_work_s", "assigned_calls")

    def __init__(self) -> None:
        self.outstanding_work_s = 0.0
        self.assigned_work_s = 0.0
        self.assigned_calls = 0

    def place(self, expected_s: float) -> None:
        self.outstanding_work_s += expected_s
        self.assigned_work_s += expected_s
        self.assigned_calls += 1

    def finish(self, expected_s: float) -> None:
        remaining = self.outstanding_work_s - expected_s
        self.outstanding_work_s = remaining if remaining > 0.0 else 0.0  # rounding never leaves it negative

    def rebase_assigned(self) -> None:
        """An engine of the cluster came back from a failure: cumulative assigned work restarts
        from the present load. Otherwise the engines that kept serving carry the work they took
        while it was down, and a policy balancing cumulative work (HexGen's W_e) sends the
        recovered engine every call until it has caught up."""
        self.assigned_work_s = self.outstanding_work_s

    def clear_outstanding(self) -> None:
        """The engine lost its calls (failure): nothing placed there is outstanding any more."""
        self.outstanding_work_s = 0.0


class LedgerMixin:
    """`outstanding_work_s`, `assigned_work_s`, `assigned_calls` of the view, read from `self.ledger`
    (the simulator's `Engine` and the gateway's `EngineState` alike)."""

    ledger: WorkLedger

    @property
    def outstanding_work_s(self) -> float:
        return self.ledger.outstanding_work_s

    @property
    def assigned_work_s(self) -> float:
        return self.ledger.assigned_work_s

    @property
    def assigned_calls(self) -> int:
        return self.ledger.assigned_calls


class ArrivalWindow:
    """Workflow arrivals of the last `ARRIVAL_RATE_WINDOW_S`, for `recent_arrival_rate_qps`.

    Before a whole window has passed, the rate is over the time elapsed, at least one second (a
    single arrival at t = 0 reads as 1 q/s, not as infinity)."""

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def note(self, now_s: float) -> None:
        self._times.append(now_s)

    def rate_qps(self, now_s: float) -> float:
        times = self._times
        while times and times[0] < now_s - ARRIVAL_RATE_WINDOW_S:
            times.popleft()
        span = min(ARRIVAL_RATE_WINDOW_S, now_s)
        return len(times) / (span if span >= 1.0 else 1.0)
