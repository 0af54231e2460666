"""The application's side of the agentsched gateway: the `openai` client plus the workflow headers.

An agentic application (CHESS-style text-to-SQL, a coding agent, ...) runs each query as a
workflow of LLM calls. The gateway schedules better when it knows which calls belong together, the
step each call is, and the workflow's SLO; this helper tags every call with those headers:

    from agentsched.client import GatewayClient

    gw = GatewayClient("http://127.0.0.1:8000", api_key=None, tenant="team-a")
    with gw.workflow(slo_s=30) as wf:                       # one query = one workflow
        kw = wf.completion("extract_keywords", prompt=question, max_tokens=64)
        cands = [wf.completion("generate_candidate", prompt=p, max_tokens=256, fanout=3) for p in prompts]
        final = wf.completion("revise", prompt=..., max_tokens=128, last=True)   # the last stage

- `workflow()` is a context manager per workflow: a fresh `X-Workflow-Id` (a UUID unless given),
  the optional `X-Workflow-SLO-S`, the tenant. Each call names its step (`X-Workflow-Step`) and
  may give its stage index and fan-out; `last=True` marks the last stage's calls
  (`X-Workflow-Last: 1`), after which the workflow counts towards SLO attainment. A workflow id is
  used for one workflow only (the gateway answers 409 to a finished one).
- `429` and `503` answers with `Retry-After` are retried after that many seconds (capped at
  `max_retry_wait_s`), at most `max_retries` times; then the `openai` error is raised.
- A streamed answer that the gateway ends with an error event (`data: {"error": ...}`, sent when
  the engine failed after the stream started) raises `StreamError` while iterating, as does a
  stream that ends without a final chunk: the answer is incomplete, send the call again.

`AsyncGatewayClient` is the same over `openai.AsyncOpenAI`. Needs the `serve` extra (`openai`).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import openai

RETRY_STATUS = (429, 503)
DEFAULT_RETRY_WAIT_S = 1.0  # when a 429/503 carries no Retry-After


class StreamError(Exception):
    """A streamed answer ended with the gateway's error event, or without its final chunk."""


@dataclass
class WorkflowTags:
    """The headers of one workflow's calls (what the gateway reads; see deploy/gateway/app.py)."""

    workflow_id: str
    tenant: str
    slo_s: float | None = None
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.slo_s is not None and not (math.isfinite(self.slo_s) and self.slo_s > 0):
            raise ValueError(f"slo_s must be a finite number of seconds > 0, got {self.slo_s}")

    def headers(self, step: str, *, last: bool = False, stage_index: int | None = None,
                fanout: int | None = None, priority: int | None = None) -> dict[str, str]:
        out = {"X-Workflow-Id": self.workflow_id, "X-Workflow-Step": step, "X-Tenant": self.tenant}
        if self.slo_s is not None:
            out["X-Workflow-SLO-S"] = f"{self.slo_s:.6f}"
        if last:
            out["X-Workflow-Last"] = "1"
        if stage_index is not None:
            out["X-Stage-Index"] = str(stage_index)
        if fanout is not None:
            out["X-Fanout"] = str(fanout)
        if priority is not None:
            out["X-Priority"] = str(priority)
        self.calls += 1
        return out


def retry_after_s(exc: openai.APIStatusError, cap_s: float) -> float | None:
    """Seconds to wait before retrying `exc`, or None if it is not a 429/503 to retry."""
    return retry_wait_s(exc.status_code, exc.response.headers.get("retry-after"), cap_s)


def retry_wait_s(status: int, retry_after: str | None, cap_s: float) -> float | None:
    """Seconds to wait before retrying an answer with this status and Retry-After header, or None
    if it is not a 429/503 to retry (for clients that speak HTTP without the openai SDK)."""
    if status not in RETRY_STATUS:
        return None
    value = retry_after
    try:
        wait = float(value) if value is not None else DEFAULT_RETRY_WAIT_S
    except ValueError:
        wait = DEFAULT_RETRY_WAIT_S
    return min(max(0.0, wait), cap_s)


def _stream_error(exc: openai.APIError) -> StreamError:
    return StreamError(f"stream ended with an error event: {exc.message}")


def _is_final(chunk: Any) -> bool:
    """A chunk that ends an answer: one with usage, or with a finish_reason on a choice."""
    return chunk.usage is not None or any(c.finish_reason for c in chunk.choices)


def _checked_stream(stream: Iterator[Any]) -> Iterator[Any]:
    final = False
    try:
        for chunk in stream:
            final = final or _is_final(chunk)
            yield chunk
    except openai.APIError as exc:
        raise _stream_error(exc) from exc
    if not final:
        raise StreamError("stream ended without its final chunk (truncated answer)")


async def _checked_astream(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    final = False
    try:
        async for chunk in stream:
            final = final or _is_final(chunk)
            yield chunk
    except openai.APIError as exc:
        raise _stream_error(exc) from exc
    if not final:
        raise StreamError("stream ended without its final chunk (truncated answer)")


class Workflow:
    """One workflow's calls (from `GatewayClient.workflow()`)."""

    def __init__(self, client: "GatewayClient", tags: WorkflowTags) -> None:
        self._client = client
        self.tags = tags

    @property
    def workflow_id(self) -> str:
        return self.tags.workflow_id

    def completion(self, step: str, *, last: bool = False, stage_index: int | None = None,
                   fanout: int | None = None, priority: int | None = None, **kwargs: Any) -> Any:
        """`client.completions.create(**kwargs)` tagged as this workflow's `step`; a stream
        (`stream=True`) is returned as an iterator that raises StreamError on an error event."""
        headers = self.tags.headers(step, last=last, stage_index=stage_index, fanout=fanout, priority=priority)
        return self._client._call(self._client.openai.completions.create, headers, kwargs)

    def chat(self, step: str, *, last: bool = False, stage_index: int | None = None,
             fanout: int | None = None, priority: int | None = None, **kwargs: Any) -> Any:
        """`client.chat.completions.create(**kwargs)` tagged as this workflow's `step`."""
        headers = self.tags.headers(step, last=last, stage_index=stage_index, fanout=fanout, priority=priority)
        return self._client._call(self._client.openai.chat.completions.create, headers, kwargs)


class GatewayClient:
    """A synchronous `openai.OpenAI` pointed at the gateway, with workflow tagging and bounded
    Retry-After retries (the openai client's own retries are off, so a 409 is never retried)."""

    def __init__(self, base_url: str, api_key: str | None = None, tenant: str = "default", max_retries: int = 5,
                 max_retry_wait_s: float = 30.0, timeout_s: float = 600.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.openai = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "no-key",
                                    max_retries=0, timeout=timeout_s)
        self.tenant = tenant
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self._sleep = sleep

    @contextmanager
    def workflow(self, workflow_id: str | None = None, slo_s: float | None = None,
                 tenant: str | None = None) -> Iterator[Workflow]:
        yield Workflow(self, WorkflowTags(workflow_id or uuid.uuid4().hex, tenant or self.tenant, slo_s))

    def _call(self, create: Callable[..., Any], headers: dict[str, str], kwargs: dict[str, Any]) -> Any:
        extra = {**(kwargs.pop("extra_headers", None) or {}), **headers}
        for attempt in range(self.max_retries + 1):
            try:
                result = create(extra_headers=extra, **kwargs)
                break
            except openai.APIStatusError as exc:
                wait = retry_after_s(exc, self.max_retry_wait_s)
                if wait is None or attempt == self.max_retries:
                    raise
                self._sleep(wait)
        return _checked_stream(result) if kwargs.get("stream") else result

    def close(self) -> None:
        self.openai.close()


class AsyncWorkflow:
    """One workflow's calls (from `AsyncGatewayClient.workflow()`)."""

    def __init__(self, client: "AsyncGatewayClient", tags: WorkflowTags) -> None:
        self._client = client
        self.tags = tags

    @property
    def workflow_id(self) -> str:
        return self.tags.workflow_id

    async def completion(self, step: str, *, last: bool = False, stage_index: int | None = None,
                         fanout: int | None = None, priority: int | None = None, **kwargs: Any) -> Any:
        headers = self.tags.headers(step, last=last, stage_index=stage_index, fanout=fanout, priority=priority)
        return await self._client._call(self._client.openai.completions.create, headers, kwargs)

    async def chat(self, step: str, *, last: bool = False, stage_index: int | None = None,
                   fanout: int | None = None, priority: int | None = None, **kwargs: Any) -> Any:
        headers = self.tags.headers(step, last=last, stage_index=stage_index, fanout=fanout, priority=priority)
        return await self._client._call(self._client.openai.chat.completions.create, headers, kwargs)

    async def completion_with_headers(self, step: str, *, last: bool = False, stage_index: int | None = None,
                                      fanout: int | None = None, priority: int | None = None,
                                      **kwargs: Any) -> tuple[Any, dict[str, str]]:
        """`completion`, plus the answer's HTTP headers (e.g. the gateway's `x-agentsched-engine`)."""
        headers = self.tags.headers(step, last=last, stage_index=stage_index, fanout=fanout, priority=priority)
        raw = await self._client._call(self._client.openai.completions.with_raw_response.create, headers, kwargs,
                                       raw=True)
        parsed = raw.parse()  # the legacy raw response parses synchronously (a stream is read later)
        result = _checked_astream(parsed) if kwargs.get("stream") else parsed
        return result, {k.lower(): v for k, v in raw.headers.items()}


class AsyncGatewayClient:
    """`GatewayClient` over `openai.AsyncOpenAI` (for applications that run workflows concurrently)."""

    def __init__(self, base_url: str, api_key: str | None = None, tenant: str = "default", max_retries: int = 5,
                 max_retry_wait_s: float = 30.0, timeout_s: float = 600.0) -> None:
        self.openai = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "no-key",
                                         max_retries=0, timeout=timeout_s)
        self.tenant = tenant
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s

    @asynccontextmanager
    async def workflow(self, workflow_id: str | None = None, slo_s: float | None = None,
                       tenant: str | None = None) -> AsyncIterator[AsyncWorkflow]:
        yield AsyncWorkflow(self, WorkflowTags(workflow_id or uuid.uuid4().hex, tenant or self.tenant, slo_s))

    async def _call(self, create: Callable[..., Any], headers: dict[str, str], kwargs: dict[str, Any],
                    raw: bool = False) -> Any:
        extra = {**(kwargs.pop("extra_headers", None) or {}), **headers}
        for attempt in range(self.max_retries + 1):
            try:
                result = await create(extra_headers=extra, **kwargs)
                break
            except openai.APIStatusError as exc:
                wait = retry_after_s(exc, self.max_retry_wait_s)
                if wait is None or attempt == self.max_retries:
                    raise
                await asyncio.sleep(wait)
        if raw:
            return result
        return _checked_astream(result) if kwargs.get("stream") else result

    async def close(self) -> None:
        await self.openai.close()


__all__ = ["GatewayClient", "AsyncGatewayClient", "Workflow", "AsyncWorkflow", "WorkflowTags", "StreamError",
           "retry_after_s", "retry_wait_s"]
