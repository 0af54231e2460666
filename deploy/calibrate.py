"""Profile a live vLLM engine and write the simulator's performance profile (envs/sim/perf.py).

Measurements (random prompt token ids, so prefix caching cannot help):
- prefill: non-streamed calls with `max_tokens=1` at several prompt sizes, one at a time; the
  latency is request overhead + one prefill iteration;
- decode: B concurrent streamed calls with a prompt of L tokens and T output tokens; the gaps
  between consecutive tokens of a stream, while all B are decoding, are iteration times at batch
  B and context about B x (L + T/2).

Fits (non-negative least squares), in the simulator's `ProfileCoefficients` terms:
    decode iteration  = base_s + decode_seq_s * B + context_token_s * C
    prefill latency   = overhead + base_s + (prefill_token_s + context_token_s) * n + attn_pair_s * n(n+1)/2
The per-call overhead (HTTP, tokenisation, detokenisation; outside the model's iterations) goes
to `fit.request_overhead_s`; the simulator should add it once per call.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from deploy.http1 import ConnectionPool, UpstreamError
from envs.sim.errors import UserError
from envs.sim.perf import PerfProfile, ProfileCoefficients

TOKEN_ID_RANGE = (10, 1000)  # ids every tiny model's vocabulary has; real models have far more


@dataclass
class CalibrationPlan:
    """What to measure; defaults take about 30 s on a tiny CPU engine."""

    prefill_tokens: tuple[int, ...] = (16, 64, 128, 256, 512, 1024, 1536)
    prefill_repeats: int = 3
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32)
    decode_contexts: tuple[int, ...] = (32, 512)
    decode_tokens: int = 24
    warmup_calls: int = 4
    seed: int = 0


@dataclass
class Samples:
    prefill: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds)
    decode: list[tuple[int, int, float]] = field(default_factory=list)  # (batch, context tokens, seconds)


class EngineProber:
    def __init__(self, url: str, model: str | None, rng: random.Random) -> None:
        self.pool = ConnectionPool(url, max_idle=64)
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
        from deploy.gateway.core import parse_vllm_metrics

        parsed = parse_vllm_metrics(metrics.body.decode())
        if "kv_cache_size_tokens" in parsed:
            info["kv_cache_tokens"] = int(parsed["kv_cache_size_tokens"])
        return info

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(*TOKEN_ID_RANGE) for _ in range(n)]

    def _body(self, n_in: int, n_out: int, stream: bool) -> bytes:
        return json.dumps({"model": self.model, "prompt": self._prompt(n_in), "max_tokens": n_out,
                           "ignore_eos": True, "temperature": 0, "stream": stream}).encode()

    async def solo_latency_s(self, n_in: int, n_out: int) -> float:
        body = self._body(n_in, n_out, False)
        t0 = time.perf_counter()
        resp = await self.pool.fetch("POST", "/v1/completions", body, timeout_s=120)
        elapsed = time.perf_counter() - t0
        if resp.status != 200:
            raise UserError(f"engine {self.url}: completion failed with {resp.status}: {resp.body[:200]!r}")
        return elapsed

    async def stream_token_times(self, n_in: int, n_out: int) -> list[float]:
        """Arrival time of every streamed token event (perf_counter seconds)."""
        resp = await self.pool.request("POST", "/v1/completions", self._body(n_in, n_out, True))
        times: list[float] = []
        buffer = b""
        try:
            async for chunk in resp.chunks():
                now = time.perf_counter()
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if event.startswith(b"data:") and b"[DONE]" not in event:
                        times.append(now)
        finally:
            resp.release()
        return times

    def close(self) -> None:
        self.pool.close()


async def _measure(prober: EngineProber, plan: CalibrationPlan, max_num_seqs: int, max_len: int) -> Samples:
    samples = Samples()
    await asyncio.gather(*(prober.solo_latency_s(64, 8) for _ in range(plan.warmup_calls)))
    for n in plan.prefill_tokens:
        if n + 2 > max_len:
            continue
        times = [await prober.solo_latency_s(n, 1) for _ in range(plan.prefill_repeats)]
        samples.prefill.append((n, statistics.median(times)))
    for ctx in plan.decode_contexts:
        for batch in plan.decode_batches:
            if batch > max_num_seqs or ctx + plan.decode_tokens > max_len:
                continue
            streams = await asyncio.gather(*(prober.stream_token_times(ctx, plan.decode_tokens) for _ in range(batch)))
            # all B decode together after the last stream's first token and before the first stream ends
            start = max(s[0] for s in streams if s)
            end = min(s[-1] for s in streams if s)
            # per stream: span / tokens inside the window (robust to events read together)
            rates = []
            for s in streams:
                inside = [t for t in s if start <= t <= end]
                if len(inside) >= 4:
                    rates.append((inside[-1] - inside[0]) / (len(inside) - 1))
            if not rates:
                continue
            context = batch * (ctx + plan.decode_tokens / 2)
            samples.decode.append((batch, int(context), statistics.median(rates)))
    return samples


def fit_profile(samples: Samples, info: dict, max_num_seqs: int) -> PerfProfile:
    if len(samples.decode) < 3 or len(samples.prefill) < 3:
        raise UserError("too few calibration samples (engine too small a max_model_len/max_num_seqs?)")
    d = np.array(samples.decode, dtype=float)
    a = np.column_stack([np.ones(len(d)), d[:, 0], d[:, 1]])
    (base_s, seq_s, ctx_s), _ = nnls(a, d[:, 2])
    p = np.array(samples.prefill, dtype=float)
    n = p[:, 0]
    y = p[:, 1] - ctx_s * n
    b = np.column_stack([np.ones(len(p)), n, n * (n + 1) / 2])
    (c0, tok_s, pair_s), _ = nnls(b, y)
    overhead = max(0.0, c0 - base_s)
    coeffs = ProfileCoefficients(base_s=float(base_s), prefill_token_s=float(tok_s), decode_seq_s=float(seq_s),
                                 context_token_s=float(ctx_s), attn_pair_s=float(pair_s))
    pred_d = a @ np.array([base_s, seq_s, ctx_s])
    pred_p = b @ np.array([c0, tok_s, pair_s]) + ctx_s * n
    fit = {
        "request_overhead_s": float(overhead),
        "decode_median_abs_rel_err": float(np.median(np.abs(pred_d - d[:, 2]) / d[:, 2])),
        "prefill_median_abs_rel_err": float(np.median(np.abs(pred_p - p[:, 1]) / p[:, 1])),
        "n_decode_samples": float(len(d)),
        "n_prefill_samples": float(len(p)),
    }
    return PerfProfile(
        engine=f"{info.get('model')} @ {info.get('url')}",
        iteration=coeffs,
        kv_capacity_tokens=info.get("kv_cache_tokens"),
        max_num_seqs=max_num_seqs,
        fit=fit,
    )


def calibrate(url: str, out: str | Path, model: str | None = None, max_num_seqs: int = 32,
              plan: CalibrationPlan | None = None) -> tuple[PerfProfile, Samples]:
    plan = plan or CalibrationPlan()

    async def run() -> tuple[PerfProfile, Samples]:
        prober = EngineProber(url.rstrip("/"), model, random.Random(plan.seed))
        try:
            info = await prober.discover()
            max_len = int(info.get("max_model_len") or 4096)
            samples = await _measure(prober, plan, max_num_seqs, max_len)
        except UpstreamError as exc:
            raise UserError(f"cannot reach engine {url}: {exc} (check --engine)") from None
        finally:
            prober.close()
        return fit_profile(samples, info, max_num_seqs), samples

    profile, samples = asyncio.run(run())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    return profile, samples
