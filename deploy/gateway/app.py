"""HTTP face of the gateway: OpenAI-compatible /v1/completions and /v1/chat/completions.

Workflow headers (all optional; a call without X-Workflow-Id is routed as a single request):
    X-Workflow-Id     client's id of the workflow (query) the call belongs to
    X-Workflow-Step   CHESS step name, e.g. "generate_candidate" (default "single")
    X-Tenant          tenant name (default "default")
    X-Workflow-SLO-S  the workflow's SLO in seconds (default gateway slo_scale x base SLO)
    X-Workflow-Last   "1" on the calls of the workflow's last stage: when they finish, the
                      workflow counts towards SLO attainment
    X-Stage-Index, X-Fanout, X-Priority   optional extras copied into the call's view

Handlers read raw bodies (no pydantic models) because request validation of the full OpenAI
schema is vLLM's job and would cost the gateway its latency budget; the gateway checks only
what it needs and answers 400 naming the field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import weakref
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deploy.gateway.core import Gateway, NoEngine, QueueFull, ShuttingDown
from deploy.gateway.state import CallState, EngineState
from deploy.http1 import UpstreamError
from envs.sim.workload import normalise_step

log = logging.getLogger("agentsched.gateway")

CHARS_PER_TOKEN = 4  # rough prompt-size estimate for text prompts (the gateway does not tokenise)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRYABLE_STATUS = {500, 502, 503, 504}


class BadRequest(Exception):
    pass


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def _shutting_down() -> JSONResponse:
    return _error(503, "gateway is shutting down; retry (on another gateway if there is one)", "unavailable",
                  {"Retry-After": "1", "Connection": "close"})


def _int_header(request: Request, name: str, default: int | None) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"header {name} must be an integer, got {value!r}") from None


def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("field 'messages' must be a non-empty list of {role, content} objects")
        chars = 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise BadRequest(f"field 'messages[{i}]' must be an object with 'role' and 'content'")
            content = m.get("content") or ""
            chars += len(content) if isinstance(content, str) else len(json.dumps(content))
        return max(1, chars // CHARS_PER_TOKEN)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return max(1, len(prompt) // CHARS_PER_TOKEN)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if all(isinstance(p, str) for p in prompt):
            return max(1, sum(len(p) for p in prompt) // CHARS_PER_TOKEN)
        if all(isinstance(p, list) for p in prompt):
            return sum(len(p) for p in prompt)
    raise BadRequest("field 'prompt' must be a string, a list of strings or a list of token ids")


def _parse_body(raw: bytes, chat: bool) -> tuple[dict[str, Any], int, int, bool]:
    if not raw:
        raise BadRequest("request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("field 'max_tokens' must be a positive integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("field 'stream' must be true or false")
    return body, _prompt_tokens(body, chat), max_tokens, stream


class FastPath:
    """ASGI app: the two completion routes go straight to their handlers; everything else
    (lifespan, GET routes) to the FastAPI app.

    FastAPI's middleware stack (error, exception, telemetry, proxy-header and body-limit layers,
    an AsyncExitStack per request) cost about as much CPU per call as the gateway's own work; on a
    shared 2-core box every extra CPU millisecond on the call path is a chance to be preempted.
    """

    def __init__(self, app: FastAPI, routes: dict[str, Any]) -> None:
        self.app = app
        self.state = app.state
        self.routes = routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.routes.get(scope["path"])
            if handler is not None:
                try:
                    response = await handler(Request(scope, receive))
                except Exception:  # noqa: BLE001 - answer 500 like FastAPI would, and log it
                    log.exception("unhandled error on %s", scope["path"])
                    response = _error(500, "internal gateway error (see the gateway log)", "internal_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(gateway: Gateway, api_key: str | None = None) -> FastPath:
    """The ASGI app around a Gateway (started/stopped with the FastAPI app's lifespan)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="agentsched gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    expected_auth = f"Bearer {api_key}".encode() if api_key else None
    cfg = gateway.config

    def _authorised(request: Request) -> bool:
        if expected_auth is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, expected_auth)

    async def _proxy(request: Request, path: str, chat: bool) -> Response:
        if not _authorised(request):
            gateway.metrics.rejected.labels("unauthorised").inc()
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                          {"WWW-Authenticate": "Bearer"})
        if gateway.shutting_down:
            gateway.metrics.rejected.labels("shutting_down").inc()
            return _shutting_down()
        try:
            body, n_in, n_out, stream = _parse_body(await request.body(), chat)
            h = request.headers
            slo_header = h.get("x-workflow-slo-s")
            slo_s = float(slo_header) if slo_header else None
            call = gateway.new_call(
                workflow_key=h.get("x-workflow-id"),
                step=normalise_step(h.get("x-workflow-step", "single")),
                tenant=h.get("x-tenant", "default"),
                input_tokens=n_in, output_tokens=n_out, stream=stream, slo_s=slo_s,
                stage_index=_int_header(request, "x-stage-index", None),
                fanout=_int_header(request, "x-fanout", 1) or 1,
                priority=_int_header(request, "x-priority", 0) or 0,
                last=h.get("x-workflow-last", "") in ("1", "true", "yes"),
            )
        except BadRequest as exc:
            gateway.metrics.rejected.labels("bad_request").inc()
            return _error(400, str(exc), "invalid_request_error")
        except ValueError:
            gateway.metrics.rejected.labels("bad_request").inc()
            return _error(400, "header X-Workflow-SLO-S must be a number of seconds", "invalid_request_error")
        if stream:
            return await _forward_stream(call, body, path)
        return await _forward(call, body, path)

    def _upstream_body(body: dict[str, Any], call: CallState, engine: EngineState) -> bytes:
        out = dict(body)
        out["model"] = engine.spec.model_name
        if cfg.pass_priority:
            out["priority"] = int(call.deadline_s * 1000)  # vLLM: lower runs first
        return json.dumps(out, separators=(",", ":")).encode()

    def _rejected(exc: Exception) -> Response:
        """The answer to a call the gateway could not place: full queue, no engine, shutting down."""
        if isinstance(exc, QueueFull):
            gateway.metrics.rejected.labels("queue_full").inc()
            return _error(429, f"engine {exc} queue is full; retry later", "rate_limit_error",
                          {"Retry-After": str(cfg.retry_after_s)})
        if isinstance(exc, NoEngine):
            gateway.metrics.rejected.labels("no_engine").inc()
            return _error(503, "no healthy engine; retry later", "unavailable", {"Retry-After": str(cfg.retry_after_s)})
        gateway.metrics.rejected.labels("shutting_down").inc()
        return _shutting_down()

    async def _forward(call: CallState, body: dict[str, Any], path: str) -> Response:
        exclude: set[int] = set()
        ok = False
        try:
            for _ in range(cfg.max_attempts):
                call.attempts += 1
                try:
                    engine = await gateway.acquire(call, exclude)
                except (QueueFull, NoEngine, ShuttingDown) as exc:
                    return _rejected(exc)
                try:
                    resp = await gateway.pools[engine.engine_id].fetch(
                        "POST", path, _upstream_body(body, call, engine), timeout_s=cfg.upstream_timeout_s)
                except UpstreamError as exc:
                    gateway.attempt_failed(call, engine, exc)
                    exclude.add(engine.engine_id)
                    continue
                finally:
                    gateway.release(call, engine)
                if resp.status in RETRYABLE_STATUS:
                    gateway.attempt_failed(call, engine, RuntimeError(f"status {resp.status}"))
                    exclude.add(engine.engine_id)
                    continue
                ok = resp.status < 400
                return Response(resp.body, status_code=resp.status,
                                media_type=resp.headers.get("content-type", "application/json"),
                                headers={"X-Agentsched-Engine": engine.name})
            gateway.metrics.rejected.labels("attempts_exhausted").inc()
            return _error(502, f"call failed on {call.attempts} attempts; engines unavailable", "upstream_error")
        finally:
            gateway.call_finished(call, ok)

    async def _forward_stream(call: CallState, body: dict[str, Any], path: str) -> Response:
        """Retry on another engine until the first byte is received; after that, stream through."""
        exclude: set[int] = set()
        for _ in range(cfg.max_attempts):
            call.attempts += 1
            try:
                engine = await gateway.acquire(call, exclude)
            except (QueueFull, NoEngine, ShuttingDown) as exc:
                gateway.call_finished(call, False)
                return _rejected(exc)
            pool = gateway.pools[engine.engine_id]
            try:
                upstream = await pool.request("POST", path, _upstream_body(body, call, engine))
                chunks = upstream.chunks()
                first = await chunks.__anext__()
            except (UpstreamError, OSError, asyncio.IncompleteReadError, StopAsyncIteration, ValueError) as exc:
                gateway.release(call, engine)
                gateway.attempt_failed(call, engine, exc if isinstance(exc, Exception) else RuntimeError("stream"))
                exclude.add(engine.engine_id)
                continue
            except BaseException:  # the client went away (cancelled) before the first byte
                gateway.release(call, engine)
                gateway.call_finished(call, False)
                raise
            if upstream.status in RETRYABLE_STATUS:
                upstream.release()
                gateway.release(call, engine)
                gateway.attempt_failed(call, engine, RuntimeError(f"status {upstream.status}"))
                exclude.add(engine.engine_id)
                continue

            done = [False]

            def finish(ok: bool, upstream=upstream, engine=engine, done=done) -> None:
                """Free the engine slot exactly once, however the stream ends."""
                if done[0]:
                    return
                done[0] = True
                upstream.release()
                gateway.release(call, engine)
                gateway.call_finished(call, ok)

            async def relay(first=first, chunks=chunks, upstream=upstream, engine=engine,
                            finish=finish) -> AsyncIterator[bytes]:
                ok = False
                try:
                    yield first
                    async for chunk in chunks:
                        yield chunk
                    ok = upstream.status < 400
                except (UpstreamError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    log.warning("stream from %s broke after first byte: %s", engine.name, exc)
                finally:
                    finish(ok)

            stream = relay()
            # a client that disconnects before the body starts leaves the generator unstarted, so
            # its `finally` never runs: free the slot when the generator is dropped instead
            weakref.finalize(stream, finish, False).atexit = False
            return StreamingResponse(stream, status_code=upstream.status,
                                     media_type=upstream.headers.get("content-type", "text/event-stream"),
                                     headers={"X-Agentsched-Engine": engine.name})
        gateway.call_finished(call, False)
        return _error(502, f"stream failed on {call.attempts} attempts; engines unavailable", "upstream_error")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _proxy(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _proxy(request, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not _authorised(request):
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
        names = sorted({e.spec.model_name for e in gateway.state.engines})
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "owned_by": "agentsched"} for n in names]})

    @app.get("/health")
    async def health() -> Response:
        up = [e.name for e in gateway.state.engines if e.healthy]
        status = 200 if up else 503
        return JSONResponse({"status": "ok" if up else "no healthy engine", "engines_up": up}, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/agentsched/info")
    async def info() -> Response:
        return JSONResponse(gateway.info())

    return FastPath(app, {"/v1/completions": completions, "/v1/chat/completions": chat_completions})
