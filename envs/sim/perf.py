"""Iteration-time models of one engine: a calibrated roofline, or a measured profile.

The simulator never steps token by token. An engine advances one *iteration* (one forward pass of
vLLM's continuous batch) or a *decode segment*: many iterations in a row whose batch does not
change. Per-iteration time is `base_s + max_j(a_j + b_j * i)` over a segment (context grows by the
batch size every iteration, so every cost term is linear in the iteration index i); sums and
inverses of that are closed-form, which keeps the simulation cost per event, not per token.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from envs.sim.catalog import Efficiency, GPUSpec, ModelSpec
from envs.sim.errors import UserError, load_yaml_mapping, validate_as

ALLREDUCE_LATENCY_S = 10e-6  # per all-reduce launch over NVLink/PCIe; a hardware constant, not a knob


@dataclass(frozen=True, slots=True)
class DecodeSegmentCost:
    """Per-iteration time over a decode segment: base_s + max over pieces of (a + b * i)."""

    base_s: float
    pieces: tuple[tuple[float, float], ...]

    def iteration_s(self, i: int) -> float:
        return self.base_s + max(a + b * i for a, b in self.pieces)

    def total_s(self, k: int) -> float:
        """Time of the first k iterations (i = 0 .. k-1)."""
        if k <= 0:
            return 0.0
        if len(self.pieces) == 1:
            a, b = self.pieces[0]
            return k * (self.base_s + a) + b * k * (k - 1) / 2.0
        (a1, b1), (a2, b2) = self.pieces[0], self.pieces[1]
        total = k * self.base_s
        if b1 == b2:
            a, b = (a1, b1) if a1 >= a2 else (a2, b2)
            return total + k * a + b * k * (k - 1) / 2.0
        # the piece with the larger intercept dominates until the lines cross (if they do)
        first, second = ((a1, b1), (a2, b2)) if a1 >= a2 else ((a2, b2), (a1, b1))
        if first[1] >= second[1]:
            split = k
        else:
            cross = (first[0] - second[0]) / (second[1] - first[1])
            split = min(k, math.floor(cross) + 1)
        a, b = first
        total += split * a + b * split * (split - 1) / 2.0
        if split < k:
            a, b = second
            n = k - split
            total += n * a + b * (split + k - 1) * n / 2.0
        return total

    def iterations_within(self, elapsed_s: float, k_max: int) -> int:
        """Largest j <= k_max with total_s(j) <= elapsed_s (iterations fully done by then).

        total_s is non-decreasing in j (every term is a non-negative cost, and rounding keeps the
        order), so the answer is unique: it is looked up next to a closed-form estimate (the j at
        which the steepest lower bound, one piece alone, reaches elapsed_s), then bisected."""
        limit = elapsed_s + 1e-12
        lo, hi = 0, k_max
        if k_max >= 1:
            guess = self._estimate(limit)
            g = k_max if guess > k_max else (guess if guess > 1 else 1)
            if self.total_s(g) <= limit:
                if g == k_max or self.total_s(g + 1) > limit:
                    return g
                lo = g + 1
            else:
                hi = g - 1
                if hi == 0 or self.total_s(hi) <= limit:
                    return hi
                hi -= 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.total_s(mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _estimate(self, limit_s: float) -> int:
        """An estimate of the iterations done by `limit_s`: the smallest, over the pieces, of the
        j at which base + that piece alone reaches it (exact when one piece dominates)."""
        if limit_s <= 0.0:
            return 0
        best = math.inf
        base = self.base_s
        for a, b in self.pieces:
            c = base + a
            if b > 0.0:
                half = 0.5 * b
                lin = c - half
                j = (math.sqrt(lin * lin + 2.0 * b * limit_s) - lin) / b
            elif c > 0.0:
                j = limit_s / c
            else:
                continue
            if j < best:
                best = j
        return int(best) if best < 1e18 else 1 << 62


class IterationModel(ABC):
    """Interface of a per-iteration cost model (roofline or measured profile)."""

    @abstractmethod
    def iteration_s(self, prefill_tokens: int, prefill_ctx_tokens: float, attn_pairs: float,
                    decode_seqs: int, decode_ctx_tokens: int) -> float:
        """Time of one iteration with this prefill work and this decode batch."""

    @abstractmethod
    def decode_segment(self, decode_seqs: int, decode_ctx_tokens: int) -> DecodeSegmentCost:
        """Cost of a run of pure-decode iterations starting with this batch and context."""


class RooflineModel(IterationModel):
    """max(compute time, memory time) + fixed overhead + tensor-parallel all-reduce time.

    Compute: 2 x parameters FLOPs per token (dense) + 4 x layers x hidden per (query, key) pair of
    attention. Memory: the weights once per iteration + every KV byte the attention reads.
    Efficiency factors come from the GPU catalog, one set per weight class (`catalog.weight_class_of`:
    4-bit weight-only kernels and 16-bit GEMMs reach different fractions of the same peaks), or
    from `efficiency` where a caller fits or compares factors.
    """

    def __init__(self, gpu: GPUSpec, model: ModelSpec, tp: int, weight_bits: int, kv_bits: int,
                 efficiency: Efficiency | None = None):
        eff = efficiency if efficiency is not None else gpu.efficiency_for(weight_bits)
        self.efficiency = eff
        flops = gpu.peak_tflops * 1e12 * tp * eff.compute
        bandwidth = gpu.hbm_bandwidth_gbps * 1e9 * tp * eff.memory
        self.s_per_token = 2.0 * model.parameters / flops
        self.s_per_attn_pair = 4.0 * model.layers * model.hidden_size / flops
        self.weight_s = model.parameters * weight_bits / 8.0 / bandwidth
        self.s_per_ctx_token = model.kv_bytes_per_token(kv_bits) / bandwidth
        self.overhead_s = eff.overhead_s
        if tp > 1:
            link = gpu.link_bandwidth_gbps * 1e9
            bytes_per_token = 2.0 * (tp - 1) / tp * model.hidden_size * 2  # ring all-reduce, bf16 activations
            self.comm_s_per_token = 2 * model.layers * bytes_per_token / link
            self.comm_fixed_s = 2 * model.layers * ALLREDUCE_LATENCY_S
        else:
            self.comm_s_per_token = 0.0
            self.comm_fixed_s = 0.0

    def iteration_s(self, prefill_tokens: int, prefill_ctx_tokens: float, attn_pairs: float,
                    decode_seqs: int, decode_ctx_tokens: int) -> float:
        tokens = prefill_tokens + decode_seqs
        compute = tokens * self.s_per_token + (attn_pairs + decode_ctx_tokens) * self.s_per_attn_pair
        memory = self.weight_s + (prefill_ctx_tokens + decode_ctx_tokens) * self.s_per_ctx_token
        comm = self.comm_fixed_s + tokens * self.comm_s_per_token
        return self.overhead_s + comm + (compute if compute > memory else memory)

    def decode_segment(self, decode_seqs: int, decode_ctx_tokens: int) -> DecodeSegmentCost:
        n, c0 = decode_seqs, decode_ctx_tokens
        base = self.overhead_s + self.comm_fixed_s + n * self.comm_s_per_token
        compute = (n * self.s_per_token + c0 * self.s_per_attn_pair, n * self.s_per_attn_pair)
        memory = (self.weight_s + c0 * self.s_per_ctx_token, n * self.s_per_ctx_token)
        return DecodeSegmentCost(base, (compute, memory))


class ProfileCoefficients(BaseModel):
    """Per-iteration time = base_s + prefill_token_s * prefill tokens + decode_seq_s * decode
    sequences + context_token_s * KV tokens read + attn_pair_s * prefill (query, key) pairs."""

    model_config = ConfigDict(extra="forbid")
    base_s: float = Field(ge=0.0)
    prefill_token_s: float = Field(ge=0.0)
    decode_seq_s: float = Field(ge=0.0)
    context_token_s: float = Field(ge=0.0)
    attn_pair_s: float = Field(0.0, ge=0.0)


class PerfProfile(BaseModel):
    """A measured performance profile of one engine type (written by `agentsched calibrate`)."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field("agentsched-perf-profile", pattern="^agentsched-perf-profile$")
    version: int = Field(1, ge=1, le=1)
    engine: str = ""
    iteration: ProfileCoefficients
    # fixed time per call outside the engine's iterations (HTTP, tokenisation, detokenisation):
    # added between the engine finishing a call and the workflow seeing it finished
    request_overhead_s: float = Field(0.0, ge=0.0)
    # engine time each new call adds to the iteration that admits it: work per request that shares
    # the engine's own CPU (tokenising, scheduling, output handling), so k calls arriving together
    # take longer than one; ~1-2 ms on the vLLM CPU engines here, negligible on GPUs
    call_engine_s: float = Field(0.0, ge=0.0)
    # API-server time per call before the engine's scheduler sees it, on the engine's own CPU:
    # calls sent together reach the scheduler one at a time (the first starts an iteration alone,
    # the rest wait for the next one), and each stretches the iteration in flight. 2-3 ms on the
    # vLLM CPU engines here (a fan-out of 4 calls takes ~2x one call); 0 (off) on GPU engines,
    # whose API server has cores of its own
    call_frontend_s: float = Field(0.0, ge=0.0)
    # extra time of the first iteration after the engine sat idle: on the CPU engines the worker's
    # threads and the cores go to sleep when there is no work, and waking them delays that
    # iteration by idle_wake_s x (1 - exp(-idle time / idle_wake_tau_s)). A call arriving at a
    # busy engine does not pay it, so it is not a per-call overhead; back-to-back calibration
    # probes never see it. 0 (off) on GPU engines
    idle_wake_s: float = Field(0.0, ge=0.0)
    idle_wake_tau_s: float = Field(0.03, gt=0.0)
    kv_capacity_tokens: PositiveInt | None = None  # overrides the memory-derived KV size
    max_num_seqs: PositiveInt | None = None
    max_num_batched_tokens: PositiveInt | None = None
    block_size_tokens: PositiveInt | None = None  # KV page size (vLLM CPU uses 128, GPUs 16)
    fit: dict[str, float] = {}  # goodness of fit, for the record

    @property
    def solo_overhead_s(self) -> float:
        """What a call alone on the engine pays besides its iterations; the simulator's expected
        latencies and the gateway's both add exactly this."""
        return self.request_overhead_s + self.call_engine_s + self.call_frontend_s

    @classmethod
    def load(cls, path: str | Path) -> "PerfProfile":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"profile: file {path} not found (run `agentsched calibrate` to write one)")
        return validate_as(cls, load_yaml_mapping(path, "profile"), "profile", path.name)

    def save(self, path: str | Path) -> None:
        with open(path, "w") as handle:
            yaml.safe_dump(self.model_dump(), handle, sort_keys=False)


class ProfileModel(IterationModel):
    """Linear model measured on a live engine; one piece, so segments are pure arithmetic series."""

    def __init__(self, profile: PerfProfile):
        self.c = profile.iteration

    def iteration_s(self, prefill_tokens: int, prefill_ctx_tokens: float, attn_pairs: float,
                    decode_seqs: int, decode_ctx_tokens: int) -> float:
        c = self.c
        return (c.base_s + c.prefill_token_s * prefill_tokens + c.decode_seq_s * decode_seqs
                + c.context_token_s * (prefill_ctx_tokens + decode_ctx_tokens) + c.attn_pair_s * attn_pairs)

    def decode_segment(self, decode_seqs: int, decode_ctx_tokens: int) -> DecodeSegmentCost:
        c = self.c
        base = c.base_s + c.decode_seq_s * decode_seqs
        return DecodeSegmentCost(base, ((c.context_token_s * decode_ctx_tokens, c.context_token_s * decode_seqs),))


def solo_call_latency_s(model: IterationModel, input_tokens: int, output_tokens: int,
                        max_num_batched_tokens: int, cached_tokens: int = 0) -> float:
    """Latency of one call alone on an engine: chunked prefill, then output_tokens - 1 decodes.

    The first `cached_tokens` of the prompt are a prefix-cache hit: they are not prefilled, but the
    prefill of the rest still attends to them (vLLM's automatic prefix caching)."""
    total = 0.0
    done = max(0, min(int(cached_tokens), input_tokens - 1))  # vLLM always computes the last prompt token
    while done < input_tokens:
        chunk = min(max_num_batched_tokens, input_tokens - done)
        pairs = chunk * (done + (chunk + 1) / 2.0)
        total += model.iteration_s(chunk, done + chunk, pairs, 0, 0)
        done += chunk
    if output_tokens > 1:
        total += model.decode_segment(1, input_tokens + 1).total_s(output_tokens - 1)
    return total
