"""Replay a CHESS trace through a live gateway, for real, and summarise it like the simulator.

Each workflow arrives at its Poisson arrival time and runs its stages in order; the calls of a
stage (fan-out) are sent in parallel and the next stage starts when all of them finished. A call
is a /v1/completions request of `input_length x token_scale` prompt token ids whose output is
exactly `output_length x token_scale` tokens (`ignore_eos` + `max_tokens`), so the tiny CPU
engines see the trace's shape at a size they keep up with; the whole workflow is scaled by
`envs.sim.workload.scale_workflow`, its prompt segments included, as the simulator scales it.

Prompts follow the simulator's prompt structure (`CallSpec.segments`, from the CHESS templates):
a shared segment has the same token ids in every call that shares it (ids drawn by an RNG seeded
with the segment's identity: scope, name, length, and the tenant or workflow it belongs to, plus
a per-replay salt, so every replay starts with cold engines as the simulator does), and the
call's own rest is fresh random ids. The engines' prefix caches then hit what the simulator's
predicts. With `prompt_segments=False`, or a trace without segments, every prompt is random ids
(no prefix-cache luck). The engines' own prefix-cache counters (`vllm:prefix_cache_queries` /
`_hits`) are read before and after the replay; the result's `prefix_cache_hit_rate` (and per
engine) is their delta. The result is `envs.sim.metrics.summarize` over the same records the
simulator fills.

With `stream=True` (`agentsched replay` default; `--no-stream` to turn off) calls are sent with
`stream: true` and `stream_options: {include_usage: true}`: the time of the first SSE event that
carries a choice is the call's `first_token_s`, so the result has `ttft_p50_s` / `ttft_p95_s` (and
`tpot_*`) like the simulator's; the exact output token count comes from the usage of the final
chunk. Non-streamed replays leave TTFT NaN (as the calibration's non-streamed calls measure).

Calls go out as plain HTTP through one keep-alive connection pool (`deploy.upstream.Upstream`),
the client the calibration measures the request path with, so the per-call time of the path the
simulator is calibrated on is the replay's own. The openai SDK `agentsched.client` wraps costs
client CPU that grows with the prompt (token-id prompts of a few hundred ids took ~8 ms more
per call here), and on this 2-core machine the client shares the cores with the engines. The
headers are `agentsched.client`'s (`WorkflowTags`): each workflow has a fresh id, 429/503 answers
wait for Retry-After as that client does, and a stream that the gateway ends with an error event
(its engine failed mid-stream) or a lost connection is sent again.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from agentsched.client import WorkflowTags, retry_wait_s
from deploy.engines import read_prefix_cache_counters
from deploy.upstream import StreamBroken, StreamErrorEvent, Upstream, UpstreamError, read_sse_completion
from deploy.vllm_metrics import PrefixCacheCounters
from envs.sim.errors import UserError
from envs.sim.metrics import CallRecord, EngineRecord, WorkflowRecord, summarize
from envs.sim.scenario import RunSpec, workload_for
from envs.sim.workload import CallSpec, SegmentSpec, WorkflowSpec, scale_workflow

TOKEN_ID_RANGE = (10, 1000)
CLIENT_RETRY_STATUS = {429, 502, 503}
CLIENT_MAX_TRIES = 20
CLIENT_BACKOFF_S = 0.2
CALL_TIMEOUT_S = 600.0


@dataclass
class ReplayConfig:
    gateway: str
    trace: str
    rate_qps: float
    slo_scale: float
    token_scale: float = 1.0
    queries: int | None = None
    seed: int = 0
    tenant: str = "default"
    api_key: str | None = None
    start_delay_s: float = 0.05
    stream: bool = False  # the CLI defaults to True; the library default keeps sim_vs_real's calls as calibrated
    # shared prompt segments get shared token ids (False: every prompt random, as with the cache off)
    prompt_segments: bool = True
    # seeds the shared segments' ids; None: a fresh salt per replay (engines start cold, as simulated)
    prompt_salt: str | None = None


def segment_token_ids(segment: SegmentSpec, owner: str, salt: str) -> tuple[int, ...]:
    """The token ids of one shared segment: a function of its identity only (scope, name, length,
    and `owner`, the tenant or workflow it belongs to; "" for templates) and the replay's salt."""
    return _segment_ids(f"{salt}|{segment.scope}|{owner}|{segment.name}|{segment.tokens}", segment.tokens)


@lru_cache(maxsize=4096)
def _segment_ids(identity: str, tokens: int) -> tuple[int, ...]:
    rng = random.Random(identity)  # str seeds hash with sha512: stable across processes
    return tuple(rng.randrange(*TOKEN_ID_RANGE) for _ in range(tokens))


def prompt_token_ids(call: CallSpec, workflow_key: str, tenant: str, salt: str, rng: random.Random) -> list[int]:
    """A call's prompt: its shared segments' ids in order, then `rng`'s fresh ids for its own rest."""
    ids: list[int] = []
    for seg in call.segments:
        owner = "" if seg.scope == "template" else tenant if seg.scope == "tenant" else workflow_key
        ids.extend(segment_token_ids(seg, owner, salt))
    ids.extend(rng.randrange(*TOKEN_ID_RANGE) for _ in range(call.input_tokens - len(ids)))
    return ids


class Replayer:
    def __init__(self, cfg: ReplayConfig) -> None:
        self.cfg = cfg
        self.pool = Upstream(cfg.gateway.rstrip("/"), connect_timeout_s=5.0, timeout_s=CALL_TIMEOUT_S)
        self.rng = random.Random(cfg.seed)
        self.calls: list[CallRecord] = []
        self.workflows: list[WorkflowRecord] = []
        self._call_ids = 0
        self._t0 = 0.0
        self._auth = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._run_id = uuid.uuid4().hex[:8]  # workflow ids are never reused across replays (409)
        self.salt = cfg.prompt_salt if cfg.prompt_salt is not None else self._run_id
        # call id -> seconds the gateway waited on the engine for the answer (non-streamed calls:
        # the gateway's X-Agentsched-Upstream-S); the rest of a call's latency is the gateway's
        self.upstream_s: dict[int, float] = {}
        self.stream_error_events = 0  # streams that ended with the gateway's error event (then retried)
        self.streams_truncated = 0  # streams that ended early with no error event (should never happen)

    def now(self) -> float:
        return time.perf_counter() - self._t0

    async def info(self) -> dict[str, Any]:
        try:
            resp = await self.pool.fetch("GET", "/v1/agentsched/info", headers=self._auth, timeout_s=10)
        except UpstreamError as exc:
            raise UserError(f"cannot reach gateway {self.cfg.gateway}: {exc} (start it with `agentsched serve`)") from None
        if resp.status != 200:
            raise UserError(f"{self.cfg.gateway} is not an agentsched gateway (GET /v1/agentsched/info -> {resp.status})")
        return json.loads(resp.body)

    def prompt(self, call: CallSpec, workflow_key: str) -> list[int]:
        if not self.cfg.prompt_segments:
            return [self.rng.randrange(*TOKEN_ID_RANGE) for _ in range(call.input_tokens)]
        return prompt_token_ids(call, workflow_key, self.cfg.tenant, self.salt, self.rng)

    async def _call(self, tags: WorkflowTags, wf_id: int, workflow_key: str, stage_index: int, fanout: int,
                    last: bool, call: CallSpec) -> CallRecord:
        """One call with the workflow's headers; 429/503 retried after Retry-After; failed attempts
        (a broken stream, its error event, a 502, a lost connection) are sent again, up to
        CLIENT_MAX_TRIES."""
        call_id = self._call_ids
        self._call_ids += 1
        step, n_in, n_out = call.step, call.input_tokens, call.output_tokens
        request: dict[str, Any] = {"model": "tiny", "prompt": self.prompt(call, workflow_key),
                                   "max_tokens": n_out, "temperature": 0, "ignore_eos": True}
        if self.cfg.stream:
            request.update(stream=True, stream_options={"include_usage": True})
        body = json.dumps(request).encode()
        headers = {**self._auth, **tags.headers(step, last=last, stage_index=stage_index, fanout=fanout)}
        ready = self.now()
        engine, out_tokens, first, finish, tries = "", n_out, math.nan, math.nan, 0
        while tries < CLIENT_MAX_TRIES:
            tries += 1
            first = math.nan
            try:
                resp = await self.pool.request("POST", "/v1/completions", body, headers, timeout_s=CALL_TIMEOUT_S)
                try:
                    if resp.status == 200 and self.cfg.stream:
                        first, usage = await read_sse_completion(resp.chunks(), self.now)
                    else:
                        data = await resp.read()
                        usage = json.loads(data).get("usage") if resp.status == 200 else None
                finally:
                    resp.release()
                if resp.status != 200:
                    if resp.status not in CLIENT_RETRY_STATUS:
                        raise UserError(f"gateway answered {resp.status}: {data[:200].decode(errors='replace')}")
                    await asyncio.sleep(retry_wait_s(resp.status, resp.headers.get("retry-after"), 30.0)
                                        or CLIENT_BACKOFF_S)
                    continue
                finish = self.now()
                engine = resp.headers.get("x-agentsched-engine", "")
                if "x-agentsched-upstream-s" in resp.headers:
                    self.upstream_s[call_id] = float(resp.headers["x-agentsched-upstream-s"])
                out_tokens = int(usage["completion_tokens"]) if usage else n_out
                break
            except StreamErrorEvent:
                self.stream_error_events += 1
            except StreamBroken:
                self.streams_truncated += 1
            except UpstreamError:
                pass
            await asyncio.sleep(CLIENT_BACKOFF_S)
        rec = CallRecord(call_id, wf_id, step, engine, n_in, out_tokens, ready, ready, math.nan, first, finish,
                         0, tries)
        self.calls.append(rec)
        return rec

    async def _workflow(self, wf_id: int, spec: WorkflowSpec, arrival_s: float, slo_s: float) -> None:
        await asyncio.sleep(max(0.0, arrival_s - self.now()))
        arrival = self.now()
        key = f"replay-{self.cfg.seed}-{wf_id}-{self._run_id}"
        tags = WorkflowTags(key, self.cfg.tenant, slo_s)
        failed = False
        n_stages = len(spec.stages)
        for si, stage in enumerate(spec.stages):
            records = await asyncio.gather(*(
                self._call(tags, wf_id, key, si, len(stage), si == n_stages - 1, c) for c in stage))
            if any(math.isnan(r.finish_s) for r in records):
                failed = True
                break
        finish = self.now() if not failed else math.nan
        self.workflows.append(WorkflowRecord(wf_id, self.cfg.tenant, arrival, finish, slo_s, spec.n_calls, failed))

    async def run(self) -> dict[str, Any]:
        try:
            return await self._run()
        finally:
            await self.pool.close()

    async def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        info = await self.info()
        # the simulator's own workload draw: same seed -> same workflows and arrival times as `simulate`
        specs, arrivals = workload_for(RunSpec(trace=cfg.trace, rate_qps=cfg.rate_qps, slo_scale=cfg.slo_scale,
                                               seed=cfg.seed, queries=cfg.queries))
        # the token scale applies to the whole workflow, its prompt segments included, as the
        # simulator applies it (envs.sim.workload.scale_workflow)
        specs = [scale_workflow(s, cfg.token_scale) for s in specs]
        arrivals = np.asarray(arrivals, dtype=float) + cfg.start_delay_s
        slo_s = cfg.slo_scale * float(info["base_slo_s"])
        counters_before = await self.prefix_counters(info)
        wall0 = time.perf_counter()
        self._t0 = time.perf_counter()
        await asyncio.gather(*(self._workflow(i, s, float(a), slo_s) for i, (s, a) in enumerate(zip(specs, arrivals))))
        wall = time.perf_counter() - wall0
        after = await self.info()
        counters_after = await self.prefix_counters(after)
        delta = {name: counters_after[name] - counters_before[name]
                 for name in counters_after if counters_after[name] is not None and counters_before.get(name) is not None}
        # busy time is not observable from outside the engine: reported as 0; the prefix-cache
        # figures are the engines' own counters over the replay (0 where an engine exposes none)
        engines = [EngineRecord(e["name"], e["gpu"], e.get("price_per_hour", 0.0), 0.0, e.get("kv_usage", 0.0),
                                sum(1 for c in self.calls if c.engine == e["name"]), int(e.get("preemptions_total", 0)),
                                prefix_hit_tokens=int(delta[e["name"]].hits_tokens) if e["name"] in delta else 0,
                                prefix_query_tokens=int(delta[e["name"]].queries_tokens) if e["name"] in delta else 0,
                                prefill_tokens=(int(delta[e["name"]].queries_tokens - delta[e["name"]].hits_tokens)
                                                if e["name"] in delta else 0))
                   for e in after["engines"]]
        result = summarize(self.workflows, self.calls, engines, sim_wall_s=wall, extra={
            "mode": "replay", "gateway": cfg.gateway, "trace": cfg.trace, "rate_qps": cfg.rate_qps,
            "slo_scale": cfg.slo_scale, "token_scale": cfg.token_scale, "base_slo_s": info["base_slo_s"],
            "policy": info.get("policy"), "seed": cfg.seed, "stream": cfg.stream,
            "prompt_segments": cfg.prompt_segments,
            # prompt tokens the replay sent (the counters' queries should equal them: a check)
            "prompt_tokens_sent": sum(c.input_tokens for c in self.calls),
        })
        if not delta:
            result["prefix_cache_hit_rate"] = math.nan  # no engine exposes the counters: unknown, not 0
        result["prefix_cache_counters"] = "engines" if delta else "unavailable"
        return result

    async def prefix_counters(self, info: dict[str, Any]) -> dict[str, PrefixCacheCounters | None]:
        """Every engine's prefix-cache counters, read from its own /metrics (None: unreadable)."""

        async def one(url: str | None) -> PrefixCacheCounters | None:
            if not url:
                return None
            try:
                return await read_prefix_cache_counters(url)
            except (httpx.HTTPError, OSError):
                return None

        engines = info["engines"]
        values = await asyncio.gather(*(one(e.get("url")) for e in engines))
        return {e["name"]: v for e, v in zip(engines, values)}


def replay(cfg: ReplayConfig, out: str | Path | None = None, with_records: bool = False) -> tuple[dict[str, Any], Replayer]:
    if cfg.rate_qps <= 0:
        raise UserError(f"--rate {cfg.rate_qps} must be > 0 queries per second")
    if cfg.token_scale <= 0:
        raise UserError(f"--token-scale {cfg.token_scale} must be > 0")
    replayer = Replayer(cfg)
    result = asyncio.run(replayer.run())
    if with_records:
        result["call_records"] = [asdict(c) for c in replayer.calls]
        result["workflow_records"] = [asdict(w) for w in replayer.workflows]
    if out is not None:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=1, default=float))
    return result, replayer
