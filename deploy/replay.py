"""Replay a CHESS trace through a live gateway, for real, and summarise it like the simulator.

Each workflow arrives at its Poisson arrival time and runs its stages in order; the calls of a
stage (fan-out) are sent in parallel and the next stage starts when all of them finished. A call
is a /v1/completions request whose prompt is `input_length x token_scale` random token ids (no
prefix-cache luck) and whose output is exactly `output_length x token_scale` tokens
(`ignore_eos` + `max_tokens`), so the tiny CPU engines see the trace's shape at a size they keep
up with. The result is `envs.sim.metrics.summarize` over the same records the simulator fills.

With `stream=True` (`agentsched replay` default; `--no-stream` to turn off) calls are sent with
`stream: true` and `stream_options: {include_usage: true}`: the time of the first SSE event that
carries a choice is the call's `first_token_s`, so the result has `ttft_p50_s` / `ttft_p95_s` (and
`tpot_*`) like the simulator's; the exact output token count comes from the usage of the final
chunk. Non-streamed replays leave TTFT NaN (as the calibration's non-streamed calls measure).

Calls go out through `agentsched.client` (the helper applications use): each workflow is one
`workflow()` context with a fresh id, 429/503 answers wait for Retry-After, and a stream that the
gateway ends with an error event (its engine failed mid-stream) is sent again.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai

from agentsched.client import AsyncGatewayClient, AsyncWorkflow, StreamError
from deploy.upstream import Upstream, UpstreamError
from envs.sim.errors import UserError
from envs.sim.metrics import CallRecord, EngineRecord, WorkflowRecord, summarize
from envs.sim.scenario import RunSpec, workload_for
from envs.sim.workload import WorkflowSpec

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


def scaled_tokens(n: int, scale: float) -> int:
    return max(1, int(round(n * scale)))


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
        self.client = AsyncGatewayClient(cfg.gateway, api_key=cfg.api_key, tenant=cfg.tenant,
                                         max_retries=CLIENT_MAX_TRIES, max_retry_wait_s=30.0, timeout_s=CALL_TIMEOUT_S)
        self._run_id = uuid.uuid4().hex[:8]  # workflow ids are never reused across replays (409)
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

    async def _call(self, wf: AsyncWorkflow, wf_id: int, stage_index: int, fanout: int, last: bool,
                    step: str, n_in: int, n_out: int) -> CallRecord:
        """One call through `agentsched.client` (the application's helper): tagged with the
        workflow's headers, 429/503 retried after Retry-After; failed attempts (a broken stream's
        error event, a 502, a lost connection) are sent again, up to CLIENT_MAX_TRIES."""
        call_id = self._call_ids
        self._call_ids += 1
        request: dict[str, Any] = {"model": "tiny", "prompt": [self.rng.randrange(*TOKEN_ID_RANGE) for _ in range(n_in)],
                                   "max_tokens": n_out, "temperature": 0, "extra_body": {"ignore_eos": True}}
        if self.cfg.stream:
            request.update(stream=True, stream_options={"include_usage": True})
        tags = {"stage_index": stage_index, "fanout": fanout, "last": last}
        ready = self.now()
        engine, out_tokens, first, finish, tries = "", n_out, math.nan, math.nan, 0
        while tries < CLIENT_MAX_TRIES:
            tries += 1
            first = math.nan
            try:
                result, headers = await wf.completion_with_headers(step, **tags, **request)
                usage = None
                if self.cfg.stream:
                    async for chunk in result:
                        if math.isnan(first) and chunk.choices:
                            first = self.now()
                        usage = chunk.usage or usage
                else:
                    usage = result.usage
                finish = self.now()
                engine = headers.get("x-agentsched-engine", "")
                if "x-agentsched-upstream-s" in headers:
                    self.upstream_s[call_id] = float(headers["x-agentsched-upstream-s"])
                out_tokens = int(usage.completion_tokens) if usage is not None else n_out
                break
            except StreamError as exc:
                self.stream_error_events += "error event" in str(exc)
                self.streams_truncated += "error event" not in str(exc)
            except openai.APIStatusError as exc:
                if exc.status_code not in CLIENT_RETRY_STATUS:
                    raise UserError(f"gateway answered {exc.status_code}: {exc.message[:200]}") from None
            except openai.APIConnectionError:
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
        failed = False
        n_stages = len(spec.stages)
        async with self.client.workflow(workflow_id=key, slo_s=slo_s) as wf:
            for si, stage in enumerate(spec.stages):
                records = await asyncio.gather(*(
                    self._call(wf, wf_id, si, len(stage), si == n_stages - 1, c.step,
                               scaled_tokens(c.input_tokens, self.cfg.token_scale),
                               scaled_tokens(c.output_tokens, self.cfg.token_scale))
                    for c in stage))
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
            await self.client.close()

    async def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        info = await self.info()
        # the simulator's own workload draw: same seed -> same workflows and arrival times as `simulate`
        specs, arrivals = workload_for(RunSpec(trace=cfg.trace, rate_qps=cfg.rate_qps, slo_scale=cfg.slo_scale,
                                               seed=cfg.seed, queries=cfg.queries))
        arrivals = np.asarray(arrivals, dtype=float) + cfg.start_delay_s
        slo_s = cfg.slo_scale * float(info["base_slo_s"])
        wall0 = time.perf_counter()
        self._t0 = time.perf_counter()
        await asyncio.gather(*(self._workflow(i, s, float(a), slo_s) for i, (s, a) in enumerate(zip(specs, arrivals))))
        wall = time.perf_counter() - wall0
        after = await self.info()
        # busy time is not observable from outside the engine: reported as 0
        engines = [EngineRecord(e["name"], e["gpu"], e.get("price_per_hour", 0.0), 0.0, e.get("kv_usage", 0.0),
                                sum(1 for c in self.calls if c.engine == e["name"]), int(e.get("preemptions_total", 0)))
                   for e in after["engines"]]
        return summarize(self.workflows, self.calls, engines, sim_wall_s=wall, extra={
            "mode": "replay", "gateway": cfg.gateway, "trace": cfg.trace, "rate_qps": cfg.rate_qps,
            "slo_scale": cfg.slo_scale, "token_scale": cfg.token_scale, "base_slo_s": info["base_slo_s"],
            "policy": info.get("policy"), "seed": cfg.seed, "stream": cfg.stream,
        })


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
