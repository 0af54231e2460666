"""Profile a live vLLM engine and write the simulator's performance profile (envs/sim/perf.py).

Measurements (random prompt token ids, so prefix caching cannot help; non-streamed calls, as the
gateway and `replay` send them):
- prefill: calls with `max_tokens=1` at several prompt sizes, one at a time; the latency is
  request overhead + one prefill iteration;
- decode: B concurrent calls (B = 1 .. max_num_seqs) with a prompt of L tokens, once with a short
  and once with a long output; the difference of the median latencies over the extra tokens is
  one decode iteration at batch B and context about B x (L + T) (prefill, request overhead and
  the staggered arrival of the B calls cancel out).
- discovered from /metrics: KV capacity and KV block size (vLLM CPU pages in 128-token blocks),
  and whether the engine runs with automatic prefix caching. The token budget per iteration is
  vLLM CPU's API-server default, 2048, unless given.
- idle wake-up: a short call after the engine sat idle for 0 .. 400 ms; the latency rises with the
  idle time to a plateau (the worker's threads and the cores sleep when there is no work), fitted
  as idle_wake_s x (1 - exp(-idle / idle_wake_tau_s)). Every other probe is sent back to back, so
  its fit is the awake engine's; the simulator adds the wake-up to an idle engine's first iteration.
- warm prefix (engines with prefix caching on): a prompt, then one of the same length sharing its
  first N blocks (`max_tokens=1`), against a cold prompt of that length; the engine's own
  counters give the hit tokens of the warm call. Not fitted: the profile fitted to the cold
  calls predicts the warm ones (the simulator's engine model skips the hit tokens' prefill and
  attends the rest to them), and the fit records how well (`warm_prefill_*`).

Fits (non-negative least squares on relative errors), in `ProfileCoefficients` terms:
    decode iteration  = base_s + decode_seq_s * B + context_token_s * C
    prefill latency   = overhead + call_engine_s + base_s + (prefill_token_s + context_token_s) * n
                        + attn_pair_s * n(n+1)/2
    burst of k calls  = mean latency rising by call_engine_s + one prompt's prefill per extra call
`call_engine_s` is engine time per new call (tokenising, scheduling, output handling on the
engine's own CPU), which the simulator adds to the iteration that admits the call; the rest of the
per-call overhead (HTTP, client, gateway; outside the engine) is `request_overhead_s`, which the
simulator adds once per call without occupying the engine.

Under load (`measure_under_load` + `fit_under_load`): isolated calls on an otherwise idle engine
underestimate what calls see when both engines, the gateway and the client share the cores. A
generic synthetic call stream (Poisson arrivals of groups of 1-6 calls sent at once, log-uniform
prompt/output sizes; not a trace's workflows) is sent through the gateway; the simulator replays
the very same calls on the engines that served them, and per engine an iteration-cost scale, a
per-call overhead and the API server's time per call (`call_frontend_s`: calls sent together
reach the scheduler one at a time and stretch the iteration in flight) are chosen so that
simulated latencies match the measured ones (least mean |log(sim/real)|). The groups are what
identify `call_frontend_s`; it then replaces `call_engine_s` (both are per-call CPU).
`measure_path_overhead` measures the overhead of the client -> gateway -> engine path alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit, nnls

from deploy.engines import prefix_caching_enabled, read_prefix_cache_counters
from deploy.gateway.core import parse_vllm_metrics
from deploy.upstream import Upstream, UpstreamError, read_sse_completion
from envs.sim.cluster import ClusterSimulator
from envs.sim.config import ClusterConfig
from envs.sim.errors import UserError
from envs.sim.perf import PerfProfile, ProfileCoefficients, ProfileModel, solo_call_latency_s
from envs.sim.workload import CallSpec, WorkflowSpec

TOKEN_ID_RANGE = (10, 1000)  # ids every tiny model's vocabulary has; real models have far more
# vLLM's default token budget per iteration for the OpenAI server on CPU (2048 x world size; GPUs
# default to 8192); not exposed on /metrics, so pass the engine's --max-num-batched-tokens if set
VLLM_CPU_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass
class CalibrationPlan:
    """What to measure; defaults take about a minute on a tiny CPU engine."""

    prefill_tokens: tuple[int, ...] = (16, 64, 128, 256, 512, 768, 1024)
    prefill_repeats: int = 5
    # batch sizes up to the engine's max_num_seqs (larger ones are skipped)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32)
    decode_contexts: tuple[int, ...] = (32, 384)
    decode_short: int = 4  # output tokens of the short and long run of a decode probe
    decode_long: int = 28
    decode_repeats: int = 3
    # k calls with short prompts sent at once: latency grows with k by the engine time per call
    burst_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    burst_prompt_tokens: int = 16
    burst_repeats: int = 5
    warmup_calls: int = 8
    # warm-prefix probes, in KV blocks of the engine: (prompt blocks, shared leading blocks);
    # prompts longer than the largest of prefill_tokens are skipped (the cold fit's range)
    warm_prefix_blocks: tuple[tuple[int, int], ...] = ((2, 1), (4, 1), (4, 3), (8, 4), (8, 7))
    warm_prefix_repeats: int = 5
    # idle time before a short call (seconds), interleaved over the repeats
    idle_gaps_s: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
    idle_repeats: int = 5
    seed: int = 0


@dataclass
class Samples:
    prefill: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds)
    decode: list[tuple[int, int, float]] = field(default_factory=list)  # (batch, context tokens, seconds)
    burst: list[tuple[int, int, float]] = field(default_factory=list)  # (calls, prompt tokens, mean seconds)
    # (prompt tokens, hit tokens the engine counted, cold seconds, warm seconds): medians per probe
    warm_prefill: list[tuple[int, int, float, float]] = field(default_factory=list)
    idle: list[tuple[float, float]] = field(default_factory=list)  # (idle seconds before the call, median seconds)
    loadavg: list[float] = field(default_factory=list)  # 1-minute load average while measuring


def loadavg_1m() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


class EngineProber:
    def __init__(self, url: str, model: str | None, rng: random.Random) -> None:
        self.pool = Upstream(url)
        self.url = url
        self.model = model
        self.rng = rng

    async def discover(self) -> dict:
        """Model name and engine limits from /v1/models and /metrics."""
        resp = await self.pool.fetch("GET", "/v1/models", timeout_s=10)
        if resp.status != 200:
            raise UserError(f"engine {self.url} answered {resp.status} on /v1/models (is it a vLLM OpenAI server?)")
        data = json.loads(resp.body)["data"][0]
        self.model = self.model or data["id"]
        info: dict = {"url": self.url, "model": self.model, "max_model_len": data.get("max_model_len")}
        metrics = await self.pool.fetch("GET", "/metrics", timeout_s=10)

        parsed = parse_vllm_metrics(metrics.body.decode())
        if "kv_cache_size_tokens" in parsed:
            info["kv_cache_tokens"] = int(parsed["kv_cache_size_tokens"])
        block = re.search(r'vllm:cache_config_info\{[^}]*\bblock_size="(\d+)"', metrics.body.decode())
        if block:  # vLLM CPU pages the KV cache in 128-token blocks, GPUs in 16
            info["block_size"] = int(block.group(1))
        enabled = prefix_caching_enabled(metrics.body.decode())
        if enabled is not None:
            info["prefix_caching"] = enabled
        return info

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(*TOKEN_ID_RANGE) for _ in range(n)]

    def _body(self, n_in: int, n_out: int, stream: bool) -> bytes:
        return json.dumps({"model": self.model, "prompt": self._prompt(n_in), "max_tokens": n_out,
                           "ignore_eos": True, "temperature": 0, "stream": stream}).encode()

    async def solo_latency_s(self, n_in: int, n_out: int, prompt: list[int] | None = None) -> float:
        body = self._body(n_in, n_out, False) if prompt is None else json.dumps({
            "model": self.model, "prompt": prompt, "max_tokens": n_out, "ignore_eos": True, "temperature": 0}).encode()
        t0 = time.perf_counter()
        resp = await self.pool.fetch("POST", "/v1/completions", body, timeout_s=120)
        elapsed = time.perf_counter() - t0
        if resp.status != 200:
            raise UserError(f"engine {self.url}: completion failed with {resp.status}: {resp.body[:200]!r}")
        return elapsed

    async def stream_token_times(self, n_in: int, n_out: int) -> list[float]:
        """Arrival time of every streamed token event (perf_counter seconds)."""
        resp = await self.pool.request("POST", "/v1/completions", self._body(n_in, n_out, True), timeout_s=120)
        times: list[float] = []
        try:
            await read_sse_completion(resp.chunks(), time.perf_counter, on_event=times.append)
        finally:
            resp.release()
        return times

    async def close(self) -> None:
        await self.pool.close()


async def _batch_latencies(prober: EngineProber, batch: int, n_in: int, n_out: int) -> list[float]:
    return list(await asyncio.gather(*(prober.solo_latency_s(n_in, n_out) for _ in range(batch))))


async def _measure(prober: EngineProber, plan: CalibrationPlan, max_num_seqs: int, max_len: int,
                   prefix_block_size: int | None = None) -> Samples:
    """Non-streamed calls only, as the gateway and `replay` send them (streaming adds per-token
    API-server work that replayed calls do not pay). With `prefix_block_size` (the engine caches
    prefixes in blocks of that size), the warm-prefix probes too."""
    samples = Samples()
    for _ in range(2):
        await asyncio.gather(*(prober.solo_latency_s(64, 8) for _ in range(plan.warmup_calls)))
    samples.loadavg.append(loadavg_1m())
    await _measure_idle_wake(prober, plan, samples)
    # prefill: one call at a time, max_tokens=1 -> request overhead + one prefill iteration
    for n in plan.prefill_tokens:
        if n + 2 > max_len:
            continue
        times = [await prober.solo_latency_s(n, 1) for _ in range(plan.prefill_repeats)]
        samples.prefill.append((n, statistics.median(times)))
    samples.loadavg.append(loadavg_1m())
    # decode: B concurrent calls with a short and a long output; the difference of the median
    # latencies over the extra tokens is one decode iteration at batch B (the prompts' prefill,
    # the request overhead and the staggered arrival of the B calls cancel out)
    extra = plan.decode_long - plan.decode_short
    for ctx in plan.decode_contexts:
        for batch in plan.decode_batches:
            if batch > max_num_seqs or ctx + plan.decode_long > max_len:
                continue
            diffs = []
            for _ in range(plan.decode_repeats):
                short = statistics.median(await _batch_latencies(prober, batch, ctx, plan.decode_short))
                long = statistics.median(await _batch_latencies(prober, batch, ctx, plan.decode_long))
                diffs.append((long - short) / extra)
            iteration = statistics.median(diffs)
            if iteration <= 0:
                continue
            context = batch * (ctx + plan.decode_short + extra / 2)
            samples.decode.append((batch, int(context), iteration))
    # bursts: k one-token calls at once; the mean latency rises by the engine's own time per call
    for k in plan.burst_sizes:
        if k > max_num_seqs:
            continue
        means = [statistics.mean(await _batch_latencies(prober, k, plan.burst_prompt_tokens, 1))
                 for _ in range(plan.burst_repeats)]
        samples.burst.append((k, plan.burst_prompt_tokens, statistics.median(means)))
    samples.loadavg.append(loadavg_1m())
    if prefix_block_size:
        await _measure_warm_prefix(prober, plan, prefix_block_size, max_len, samples)
    return samples


async def _measure_idle_wake(prober: EngineProber, plan: CalibrationPlan, samples: Samples) -> None:
    """A 16-token, one-output call after each idle time of the plan, the idle times interleaved
    so that drift in the machine's load moves them alike."""
    times: dict[float, list[float]] = {gap: [] for gap in plan.idle_gaps_s}
    for _ in range(plan.idle_repeats):
        for gap in plan.idle_gaps_s:
            await asyncio.sleep(gap)
            times[gap].append(await prober.solo_latency_s(16, 1))
    samples.idle.extend((gap, statistics.median(ts)) for gap, ts in times.items() if ts)


def fit_idle_wake(idle: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(idle_wake_s, idle_wake_tau_s, median |relative error|) of latency(idle) = awake latency +
    idle_wake_s x (1 - exp(-idle / idle_wake_tau_s)); no wake-up (0 s) when the curve does not rise."""
    if len({gap for gap, _ in idle}) < 3:
        return 0.0, 0.03, float("nan")
    gap = np.array([g for g, _ in idle], dtype=float)
    lat = np.array([x for _, x in idle], dtype=float)

    def curve(g: np.ndarray, awake_s: float, wake_s: float, tau_s: float) -> np.ndarray:
        return awake_s + wake_s * -np.expm1(-g / tau_s)

    start = (float(lat.min()), max(0.0, float(lat.max() - lat.min())), 0.03)
    try:
        (awake_s, wake_s, tau_s), _ = curve_fit(curve, gap, lat, p0=start,
                                                bounds=([0.0, 0.0, 1e-3], [np.inf, np.inf, 2.0]))
    except (RuntimeError, ValueError):
        return 0.0, 0.03, float("nan")
    err = float(np.median(np.abs(curve(gap, awake_s, wake_s, tau_s) - lat) / lat))
    return float(wake_s), float(tau_s), err


async def _measure_warm_prefix(prober: EngineProber, plan: CalibrationPlan, block_size: int, max_len: int,
                               samples: Samples) -> None:
    """Per probe: a cold prompt of L tokens; then a prompt P, and one of L tokens sharing P's first
    N blocks (the warm call). The hit tokens are the engine's own count over the warm call."""
    for prompt_blocks, shared_blocks in plan.warm_prefix_blocks:
        n = prompt_blocks * block_size
        shared = shared_blocks * block_size
        if n + 2 > max_len or shared >= n or n > max(plan.prefill_tokens):
            continue
        cold, warm, hits = [], [], []
        for _ in range(plan.warm_prefix_repeats):
            cold.append(await prober.solo_latency_s(n, 1))
            first = prober._prompt(n)
            await prober.solo_latency_s(n, 1, prompt=first)
            before = await read_prefix_cache_counters(prober.url)
            warm.append(await prober.solo_latency_s(n, 1, prompt=first[:shared] + prober._prompt(n - shared)))
            after = await read_prefix_cache_counters(prober.url)
            if before is not None and after is not None:
                hits.append((after - before).hits_tokens)
        samples.warm_prefill.append((n, int(statistics.median(hits)) if hits else shared,
                                     statistics.median(cold), statistics.median(warm)))


def fit_profile(samples: Samples, info: dict, max_num_seqs: int,
                max_num_batched_tokens: int | None = None) -> PerfProfile:
    if len(samples.decode) < 3 or len(samples.prefill) < 3:
        raise UserError("too few calibration samples (engine too small a max_model_len/max_num_seqs?)")
    d = np.array(samples.decode, dtype=float)
    # relative least squares: every sample weighs the same whatever its size
    a = np.column_stack([np.ones(len(d)), d[:, 0], d[:, 1]])
    w = 1.0 / d[:, 2]
    (base_s, seq_s, ctx_s), _ = nnls(a * w[:, None], d[:, 2] * w)
    p = np.array(samples.prefill, dtype=float)
    n = p[:, 0]
    y = p[:, 1] - ctx_s * n
    b = np.column_stack([np.ones(len(p)), n, n * (n + 1) / 2])
    wp = 1.0 / p[:, 1]
    (c0, tok_s, pair_s), _ = nnls(b * wp[:, None], y * wp)
    coeffs = ProfileCoefficients(base_s=float(base_s), prefill_token_s=float(tok_s), decode_seq_s=float(seq_s),
                                 context_token_s=float(ctx_s), attn_pair_s=float(pair_s))
    # bursts of k calls admitted together: the simulator runs them in one iteration whose cost
    # grows by (prompt's prefill + call_engine_s) per call; the slope of the measured mean latency
    # over k, less the prefill part, is the engine's own time per call
    call_s = 0.0
    if len(samples.burst) >= 2:
        kb = np.array([b[0] for b in samples.burst], dtype=float)
        mean_s = np.array([b[2] for b in samples.burst])
        slope = float(np.polyfit(kb, mean_s, 1)[0])
        nb = samples.burst[0][1]
        per_call_prefill = ProfileModel(PerfProfile(iteration=coeffs)).iteration_s(nb, nb, nb * (nb + 1) / 2, 0, 0) - base_s
        call_s = max(0.0, slope - per_call_prefill)
    # the prefill iteration's fixed part is the decode fit's base_s plus one call's engine time;
    # the rest of the intercept is per-call time outside the engine (HTTP, client, gateway)
    overhead = max(0.0, c0 - base_s - call_s)
    pred_d = a @ np.array([base_s, seq_s, ctx_s])
    pred_p = b @ np.array([c0, tok_s, pair_s]) + ctx_s * n
    fit = {
        "request_overhead_s": float(overhead),
        "call_engine_s": float(call_s),
        "decode_median_abs_rel_err": float(np.median(np.abs(pred_d - d[:, 2]) / d[:, 2])),
        "prefill_median_abs_rel_err": float(np.median(np.abs(pred_p - p[:, 1]) / p[:, 1])),
        "n_decode_samples": float(len(d)),
        "n_prefill_samples": float(len(p)),
    }
    if samples.loadavg:
        fit["loadavg_1m_median"] = float(np.nanmedian(samples.loadavg))
    if samples.warm_prefill:
        fit.update(warm_prefill_check(samples.warm_prefill, coeffs, c0 - base_s))
    wake_s, tau_s, wake_err = fit_idle_wake(samples.idle)
    if samples.idle:
        fit.update({"idle_wake_s": wake_s, "idle_wake_tau_s": tau_s, "idle_wake_median_abs_rel_err": wake_err})
    return PerfProfile(
        engine=f"{info.get('model')} @ {info.get('url')}",
        iteration=coeffs,
        request_overhead_s=float(overhead),
        call_engine_s=float(call_s),
        kv_capacity_tokens=info.get("kv_cache_tokens"),
        block_size_tokens=info.get("block_size"),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        idle_wake_s=wake_s,
        idle_wake_tau_s=tau_s,
        fit=fit,
    )


def warm_prefill_check(warm: list[tuple[int, int, float, float]], coeffs: ProfileCoefficients,
                       per_call_s: float) -> dict[str, float]:
    """How well the profile fitted to cold prompts predicts prompts with a warm prefix: the
    simulator's prefill of a prompt of n tokens whose first h are hits is one iteration of the
    n - h uncached tokens attending to all n (`solo_call_latency_s` with `cached_tokens`), plus the
    per-call time of every call (`per_call_s`: request overhead and engine time per call).

    Three figures: the warm calls' latency error (signed median, and median of its size); the
    error of the warm/cold latency ratio (what `EngineModel.expected_latency_with_hits_s` scales
    a step's expected latency by); and the time the hits saved, real over simulated, summed over
    the probes. A probe's cold and warm calls alternate, so the ratio and the saving are robust to
    load from other jobs on the machine, which moves both alike; the absolute warm latency is not."""
    model = ProfileModel(PerfProfile(iteration=coeffs))
    errs, ratio_errs, saved_real, saved_sim = [], [], [], []
    for n, hit, cold_s, warm_s in warm:
        cold_pred = per_call_s + solo_call_latency_s(model, n, 1, n)
        warm_pred = per_call_s + solo_call_latency_s(model, n, 1, n, cached_tokens=hit)
        errs.append((warm_pred - warm_s) / warm_s)
        ratio_errs.append((warm_pred / cold_pred) / (warm_s / cold_s) - 1.0)
        saved_real.append(cold_s - warm_s)
        saved_sim.append(cold_pred - warm_pred)
    sim_saved = float(np.sum(saved_sim))
    return {"warm_prefill_median_abs_rel_err": float(np.median(np.abs(errs))),
            "warm_prefill_median_rel_err": float(np.median(errs)), "n_warm_prefill_samples": float(len(warm)),
            "warm_cold_ratio_median_rel_err": float(np.median(ratio_errs)),
            "warm_prefill_saved_real_s": float(np.sum(saved_real)), "warm_prefill_saved_sim_s": sim_saved,
            "warm_prefill_saved_ratio": float(np.sum(saved_real)) / sim_saved if sim_saved > 0 else float("nan"),
            "warm_prefill_hit_tokens": float(sum(h for _, h, _, _ in warm))}


def calibrate(url: str, out: str | Path, model: str | None = None, max_num_seqs: int = 32,
              plan: CalibrationPlan | None = None,
              max_num_batched_tokens: int | None = VLLM_CPU_MAX_NUM_BATCHED_TOKENS) -> tuple[PerfProfile, Samples]:
    plan = plan or CalibrationPlan()

    async def run() -> tuple[PerfProfile, Samples]:
        prober = EngineProber(url.rstrip("/"), model, random.Random(plan.seed))
        try:
            info = await prober.discover()
            max_len = int(info.get("max_model_len") or 4096)
            block = int(info["block_size"]) if info.get("prefix_caching") and info.get("block_size") else None
            samples = await _measure(prober, plan, max_num_seqs, max_len, prefix_block_size=block)
        except UpstreamError as exc:
            raise UserError(f"cannot reach engine {url}: {exc} (check --engine)") from None
        finally:
            await prober.close()
        return fit_profile(samples, info, max_num_seqs, max_num_batched_tokens), samples

    profile, samples = asyncio.run(run())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    return profile, samples


def measure_path_overhead(url: str, profiles: dict[str, PerfProfile], calls: int = 40, n_in: int = 16,
                          model: str | None = None, seed: int = 1) -> dict[str, float]:
    """Per-call overhead of the whole request path as `replay` uses it (client -> gateway -> engine
    -> gateway -> client), per engine: the median latency of solo `max_tokens=1` calls sent
    through `url` (a gateway; the engine is read from its X-Agentsched-Engine header) minus the
    profile's prefill iteration. Engines the gateway never picked are left out."""

    async def run() -> dict[str, list[float]]:
        prober = EngineProber(url.rstrip("/"), model or "tiny", random.Random(seed))
        out: dict[str, list[float]] = {}
        try:
            for _ in range(4):  # warm the connections
                await prober.pool.fetch("POST", "/v1/completions", prober._body(n_in, 1, False), timeout_s=120)
            for _ in range(calls):
                body = prober._body(n_in, 1, False)
                t0 = time.perf_counter()
                resp = await prober.pool.fetch("POST", "/v1/completions", body, timeout_s=120)
                elapsed = time.perf_counter() - t0
                if resp.status != 200:
                    raise UserError(f"{url}: completion failed with {resp.status}: {resp.body[:200]!r}")
                out.setdefault(resp.headers.get("x-agentsched-engine", ""), []).append(elapsed)
        except UpstreamError as exc:
            raise UserError(f"cannot reach {url}: {exc}") from None
        finally:
            await prober.close()
        return out

    latencies = asyncio.run(run())
    overheads = {}
    for name, lat in latencies.items():
        if name in profiles:
            p = profiles[name]
            # everything a solo call pays on the engine side, as the simulator adds it
            engine_side_s = p.solo_overhead_s - p.request_overhead_s
            model_s = engine_side_s + solo_call_latency_s(ProfileModel(p), n_in, 1, p.max_num_batched_tokens or 8192)
            overheads[name] = max(0.0, statistics.median(lat) - model_s)
    return overheads


@dataclass
class LoadPlan:
    """A synthetic call stream for `fit_under_load` (generic, not any trace's workflows): Poisson
    arrivals of groups of calls sent at once (agentic fan-outs), prompt and output lengths
    log-uniform, the same within a group (one fan-out's calls are alike)."""

    rate_calls_s: float = 8.0
    duration_s: float = 45.0  # ~180 calls per engine: at 20 s the fit moved by 10-20% between runs
    prompt_tokens: tuple[int, int] = (10, 700)
    output_tokens: tuple[int, int] = (1, 40)
    # a group's size is drawn from these; single calls alone leave the API-server time per call
    # (call_frontend_s) unidentified, and it is what a fan-out's calls wait for on a shared core
    group_sizes: tuple[int, ...] = (1, 1, 2, 3, 4, 6)
    seed: int = 7


@dataclass
class LoadSample:
    sent_s: float
    engine: str
    input_tokens: int
    output_tokens: int
    latency_s: float


def load_plan_calls(plan: LoadPlan) -> list[tuple[float, int, int]]:
    """(send time, prompt tokens, output tokens) of every call in the plan's stream."""
    rng = random.Random(plan.seed)
    sizes = plan.group_sizes or (1,)
    group_rate = plan.rate_calls_s / (sum(sizes) / len(sizes))
    calls, t = [], 0.0
    while True:
        t += rng.expovariate(group_rate)
        if t > plan.duration_s:
            break
        lo, hi = plan.prompt_tokens
        n_in = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        lo, hi = plan.output_tokens
        n_out = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        calls.extend((t, n_in, n_out) for _ in range(rng.choice(sizes)))
    return calls


def measure_under_load(url: str, plan: LoadPlan | None = None, model: str = "tiny") -> list[LoadSample]:
    """Send `plan`'s call stream through `url` (a gateway, as `replay` does; non-streamed) and
    record every call's latency and the engine that served it."""
    plan = plan or LoadPlan()
    calls = load_plan_calls(plan)
    rng = random.Random(plan.seed + 1)  # the prompts' token ids

    async def run() -> list[LoadSample]:
        prober = EngineProber(url.rstrip("/"), model, rng)
        out: list[LoadSample] = []
        t0 = time.perf_counter()

        async def one(at: float, n_in: int, n_out: int) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            body = prober._body(n_in, n_out, False)
            sent = time.perf_counter()
            resp = await prober.pool.fetch("POST", "/v1/completions", body, timeout_s=300)
            if resp.status != 200:
                raise UserError(f"{url}: completion failed with {resp.status}: {resp.body[:200]!r}")
            out.append(LoadSample(sent - t0, resp.headers.get("x-agentsched-engine", ""), n_in, n_out,
                                  time.perf_counter() - sent))

        try:
            await asyncio.gather(*(one(*c) for c in calls))
        except UpstreamError as exc:
            raise UserError(f"cannot reach {url}: {exc}") from None
        finally:
            await prober.close()
        return out

    return asyncio.run(run())


def scaled_profile(profile: PerfProfile, k: float) -> PerfProfile:
    """The profile with every engine-CPU cost (iterations, per-call engine and API-server time) times k."""
    k = float(k)
    c = profile.iteration
    p = profile.model_copy(deep=True)
    p.iteration = ProfileCoefficients(base_s=c.base_s * k, prefill_token_s=c.prefill_token_s * k,
                                      decode_seq_s=c.decode_seq_s * k, context_token_s=c.context_token_s * k,
                                      attn_pair_s=c.attn_pair_s * k)
    p.call_engine_s = profile.call_engine_s * k
    p.call_frontend_s = profile.call_frontend_s * k
    return p


def simulate_samples(samples: list[LoadSample], profiles: dict[str, PerfProfile], scale: dict[str, float],
                     overhead: dict[str, float], frontend: dict[str, float] | None = None) -> np.ndarray:
    """Simulated latency of every sample: each call a one-call workflow arriving when it was sent,
    on the engine that served it, with the profiles' iteration costs x `scale`, `overhead` and,
    where given, API-server time per call `frontend` (in place of the engine time per call)."""

    names = sorted(profiles)
    tmp: list[PerfProfile] = []
    for name in names:
        p = scaled_profile(profiles[name], scale.get(name, 1.0))
        p.request_overhead_s = overhead.get(name, p.request_overhead_s)
        if frontend is not None and name in frontend:
            p.call_frontend_s = frontend[name]
            p.call_engine_s = 0.0
        tmp.append(p)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, p in zip(names, tmp):
            path = Path(d) / f"{name}.yaml"
            p.save(path)
            paths.append(path)
        cluster = ClusterConfig.model_validate({"name": "load-calibration", "engines": [
            {"name": name, "gpu": "L4", "model": "Llama-3.1-8B", "profile": str(path)} for name, path in zip(names, paths)]})
        order = sorted(range(len(samples)), key=lambda i: samples[i].sent_s)
        specs = [WorkflowSpec(stages=((CallSpec("load", samples[i].input_tokens, samples[i].output_tokens),),))
                 for i in order]
        sim = ClusterSimulator(cluster, specs, [samples[i].sent_s for i in order], slo_scale=1.0,
                               step_tokens={"load": (100.0, 10.0)})
        engine_of = {name: i for i, name in enumerate(names)}
        while True:
            call = sim.next_decision()
            if call is None:
                break
            sim.dispatch(call, engine_of.get(samples[order[call.workflow_id]].engine, 0))
        out = np.empty(len(samples))
        for wf in sim.workflows:
            i = order[wf.workflow_id]
            out[i] = wf.finish_time_s - wf.arrival_time_s
    return out


def fit_under_load(samples: list[LoadSample], profiles: dict[str, PerfProfile],
                   scales: tuple[float, ...] = tuple(np.round(np.arange(0.5, 5.01, 0.1), 2)),
                   overheads_ms: tuple[float, ...] = tuple(np.round(np.arange(0.0, 300.01, 0.25), 2)),
                   frontends_ms: tuple[float, ...] | None = tuple(float(x) for x in range(0, 9)),
                   refine_step: float = 0.01, refine_frontend_ms: float = 0.25,
                   solo_per_call_s: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Per engine, the iteration-cost scale, per-call overhead and API-server time per call
    (`frontends_ms`; None keeps the profiles' own per-call times) under which the simulator best
    reproduces the calls measured under load (least mean |log(sim / real)|). The engines are
    independent given each call's engine, so one grid of simulations fits all of them. After the
    coarse grid, each engine's scale (and API-server time) is refined in `refine_step`
    (`refine_frontend_ms`) steps around its best: small calls are a few base iterations plus the
    overhead, so a 0.1 step in scale or a 3 ms step in overhead alone moved their predicted median
    by 10%.

    `solo_per_call_s` (per engine: what a solo call through the request path measured besides its
    iteration, `measure_path_overhead` + the engine time per call) ties the overhead to the API-server
    time: overhead = solo_per_call_s - API-server time, so every candidate reproduces the measured
    solo calls and the stream only has to tell the per-call time outside the engine from the time
    on the engine's CPU (which fan-outs wait for)."""
    real = np.array([s.latency_s for s in samples])
    names = sorted(profiles)
    mask = {n: np.array([s.engine == n for s in samples]) for n in names}
    overheads_s = np.asarray(overheads_ms, dtype=float) / 1e3
    best: dict[str, tuple[float, float, float, float | None]] = {}

    def scan(scale_of: dict[str, float], frontend_of: dict[str, float] | None) -> None:
        # overhead shifts every latency by a constant: simulate once without it, add it after
        base = simulate_samples(samples, profiles, scale_of, {n: 0.0 for n in names}, frontend_of)
        for n in names:
            m = mask[n]
            if not m.any():
                continue
            candidates = overheads_s
            if solo_per_call_s is not None and n in solo_per_call_s:
                frontend_s = frontend_of[n] if frontend_of is not None else profiles[n].call_frontend_s
                candidates = np.array([max(0.0, solo_per_call_s[n] - frontend_s)])
            errs = np.mean(np.abs(np.log((base[m][None, :] + candidates[:, None]) / real[m][None, :])), axis=1)
            i = int(np.argmin(errs))
            if n not in best or errs[i] < best[n][2]:
                best[n] = (float(scale_of[n]), float(candidates[i]), float(errs[i]),
                           None if frontend_of is None else frontend_of[n])

    for k in scales:
        for f in (frontends_ms if frontends_ms is not None else (None,)):
            scan({n: float(k) for n in names}, None if f is None else {n: f / 1e3 for n in names})
    if refine_step > 0 and best:
        coarse = {n: best[n][0] for n in best}
        width = max(np.diff(sorted(scales)).max(initial=0.0), refine_step) if len(scales) > 1 else 0.0
        f_offsets = [0.0]
        if frontends_ms is not None and len(frontends_ms) > 1 and refine_frontend_ms > 0:
            f_width = float(np.diff(sorted(frontends_ms)).max())
            f_offsets = [float(x) for x in np.arange(-f_width, f_width + refine_frontend_ms / 2, refine_frontend_ms)]
        coarse_f = {n: (best[n][3] or 0.0) * 1e3 if n in best else 0.0 for n in names}
        for d in np.arange(-width, width + refine_step / 2, refine_step):
            for df in f_offsets:
                frontend = (None if frontends_ms is None
                            else {n: max(0.0, round(coarse_f[n] + df, 4)) / 1e3 for n in names})
                scan({n: max(refine_step, round(coarse.get(n, 1.0) + float(d), 4)) for n in names}, frontend)
    out: dict[str, dict[str, float]] = {}
    for n, (k, o, err, f) in best.items():
        out[n] = {"scale": k, "overhead_s": o, "mean_abs_log_err": err, "n_calls": float(mask[n].sum())}
        if f is not None:
            out[n]["frontend_s"] = f
    return out


def apply_load_fit(profile: PerfProfile, fit: dict[str, float]) -> PerfProfile:
    """The profile with iteration costs x fit['scale'], request overhead fit['overhead_s'] and,
    if fitted, API-server time per call fit['frontend_s'] (which then carries all per-call CPU:
    the engine time per call from the idle-engine bursts is dropped, not counted twice)."""
    k = fit["scale"]
    p = scaled_profile(profile, k)
    p.request_overhead_s = fit["overhead_s"]
    if "frontend_s" in fit:
        p.call_frontend_s = fit["frontend_s"]
        p.call_engine_s = 0.0
        p.fit["load_frontend_s"] = fit["frontend_s"]
    p.fit.update({"load_scale": k, "load_overhead_s": fit["overhead_s"], "request_overhead_s": fit["overhead_s"],
                  "load_mean_abs_log_err": fit["mean_abs_log_err"], "load_n_calls": fit["n_calls"]})
    return p
