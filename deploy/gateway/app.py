"""HTTP face of the gateway: OpenAI-compatible /v1/completions and /v1/chat/completions.

Workflow headers (all optional; a call without X-Workflow-Id is routed as a single request):
    X-Workflow-Id     client's id of the workflow (query) the call belongs to; the id of a
                      workflow that already finished is refused with 409 for
                      `FINISHED_KEY_MEMORY_S` after it finished (use a fresh id per workflow)
    X-Workflow-Step   CHESS step name, e.g. "generate_candidate" (default "single")
    X-Tenant          tenant name (default "default")
    X-Workflow-SLO-S  the workflow's SLO in seconds, finite and > 0 (default gateway slo_scale x
                      base SLO)
    X-Workflow-Last   "1" on the calls of the workflow's last stage: when they finish, the
                      workflow counts towards SLO attainment
    X-Stage-Index (>= 0), X-Fanout (>= 1), X-Priority (integer)   extras copied into the call's view
A header with a bad value answers 400 naming the header.

Model names: every engine serves the same model, each under its own name (`model` in the cluster
file). A call's `model` must be absent or one of the names `/v1/models` lists (else 404, naming
the field); the gateway sends the chosen engine's own name upstream, for every engine alike.

API keys: with an API key set, every endpoint but `/health` needs `Authorization: Bearer KEY`
(the scheme is matched case-insensitively, RFC 7235; keys are compared in constant time).
`/metrics` also accepts its own key when one is set (Prometheus scrapes with it).

Handlers read raw bodies (no pydantic models) because request validation of the full OpenAI
schema is vLLM's job and would cost the gateway its latency budget; the gateway checks only
what it needs and answers 400 naming the field.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
import weakref
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deploy.gateway.core import (
    Gateway,
    NoEngine,
    QueueFull,
    ShuttingDown,
    WorkflowFinished,
)
from deploy.gateway.prefix_index import CHARS_PER_TOKEN, is_token_prompt, prompt_segments
from deploy.gateway.state import CallState, EngineState
from deploy.upstream import UpstreamError
from envs.sim.workload import normalise_step

log = logging.getLogger("agentsched.gateway")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRYABLE_STATUS = {500, 502, 503, 504}


class BadRequest(Exception):
    pass


def stream_error_event(message: str, kind: str = "upstream_error", code: int = 502) -> bytes:
    """The end of a stream that broke after its first byte: an OpenAI-style error event, then
    `[DONE]` (what OpenAI-compatible servers, vLLM's included, send when a stream fails)."""
    error = json.dumps({"error": {"message": message, "type": kind, "code": code}}, separators=(",", ":"))
    return b"data: " + error.encode() + b"\n\ndata: [DONE]\n\n"


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def _shutting_down() -> JSONResponse:
    return _error(503, "gateway is shutting down; retry (on another gateway if there is one)", "unavailable",
                  {"Retry-After": "1", "Connection": "close"})


def _int_header(request: Request, name: str, default: int | None, minimum: int | None = None) -> int | None:
    value = request.headers.get(name.lower())
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or (minimum is not None and number < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise BadRequest(f"header {name} must be an integer{bound}, got {value!r}")
    return number


def _slo_header(request: Request) -> float | None:
    value = request.headers.get("x-workflow-slo-s")
    if value is None:
        return None
    try:
        slo_s = float(value)
    except ValueError:
        slo_s = math.nan
    if not math.isfinite(slo_s) or slo_s <= 0:
        raise BadRequest(f"header X-Workflow-SLO-S must be a finite number of seconds > 0, got {value!r}")
    return slo_s


def bearer_token(authorization: str) -> str | None:
    """The credentials of an `Authorization: Bearer TOKEN` header; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _key_matches(token: str | None, key: str | None) -> bool:
    return key is not None and token is not None and hmac.compare_digest(token.encode(), key.encode())


def _unauthorised() -> JSONResponse:
    return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                  {"WWW-Authenticate": "Bearer"})


def _all_token_ids(items: list[Any]) -> bool:
    """Whether every item is an int (bools are not): msgspec checks in C, where the Python loop
    over a 10k-token prompt was the largest cost of the gateway's request path."""
    try:
        msgspec.convert(items, list[int])
    except msgspec.ValidationError:
        return False
    return True


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
        if _all_token_ids(prompt):
            return len(prompt)
        if all(isinstance(p, str) for p in prompt):
            return max(1, sum(len(p) for p in prompt) // CHARS_PER_TOKEN)
        if all(isinstance(p, list) for p in prompt):
            return sum(len(p) for p in prompt)
    raise BadRequest("field 'prompt' must be a string, a list of strings or a list of token ids")


_JSON = msgspec.json.Decoder()



def _parse_body(raw: bytes, chat: bool) -> tuple[dict[str, Any], int, int, bool]:
    if not raw:
        raise BadRequest("request body is empty; send a JSON object")
    try:
        body = _JSON.decode(raw)  # msgspec: a 10k-token prompt in about a third of json.loads' time
    except msgspec.DecodeError as exc:
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

    def __init__(self, app: FastAPI, routes: dict[str, Any], api_key: str | None = None,
                 metrics_key: str | None = None) -> None:
        self.app = app
        self.state = app.state
        self.routes = routes
        self.api_key = api_key
        self.metrics_key = metrics_key

    def authorised(self, scope: dict) -> bool:
        """Every path but /health needs the API key (when one is set); /metrics also takes its own key."""
        path = scope["path"]
        if path == "/health":
            return True
        if self.api_key is None and (self.metrics_key is None or path != "/metrics"):
            return True
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = bearer_token(header.decode("latin-1"))
        if _key_matches(token, self.api_key):
            return True
        return path == "/metrics" and _key_matches(token, self.metrics_key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.authorised(scope):
            self.state.gateway.metrics.rejected.labels("unauthorised").inc()
            await _unauthorised()(scope, receive, send)
            return
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


def build_app(gateway: Gateway, api_key: str | None = None, metrics_key: str | None = None) -> FastPath:
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
    cfg = gateway.config
    model_names = sorted({e.spec.model_name for e in gateway.state.engines})

    async def _proxy(request: Request, path: str, chat: bool) -> Response:
        if gateway.shutting_down:
            gateway.metrics.rejected.labels("shutting_down").inc()
            return _shutting_down()
        try:
            raw = await request.body()
            body, n_in, n_out, stream = _parse_body(raw, chat)
            model = body.get("model")
            if model is not None and model not in model_names:
                gateway.metrics.rejected.labels("unknown_model").inc()
                return _error(404, f"field 'model': {model!r} is not served here; use one of {model_names} "
                              "(GET /v1/models) or leave it out", "invalid_request_error")
            h = request.headers
            slo_s = _slo_header(request)
            stage_index = _int_header(request, "X-Stage-Index", None, minimum=0)
            fanout = _int_header(request, "X-Fanout", 1, minimum=1)
            priority = _int_header(request, "X-Priority", 0)
            segments = (prompt_segments(body, chat, n_in, gateway.prefix_segment_tokens)
                        if gateway.prefix_index_enabled else ())
            call = gateway.new_call(
                workflow_key=h.get("x-workflow-id"),
                step=normalise_step(h.get("x-workflow-step", "single")),
                tenant=h.get("x-tenant", "default"),
                input_tokens=n_in, output_tokens=n_out, stream=stream, slo_s=slo_s,
                stage_index=stage_index, fanout=fanout or 1, priority=priority or 0,
                last=h.get("x-workflow-last", "") in ("1", "true", "yes"), segments=segments,
                token_chain=bool(segments) and is_token_prompt(body, chat),
            )
        except BadRequest as exc:
            gateway.metrics.rejected.labels("bad_request").inc()
            return _error(400, str(exc), "invalid_request_error")
        except WorkflowFinished as exc:
            gateway.metrics.rejected.labels("workflow_finished").inc()
            return _error(409, f"header X-Workflow-Id: workflow {str(exc)!r} already finished; "
                          "send a new workflow under a fresh id", "conflict_error")
        if stream:
            return await _forward_stream(call, body, raw, path)
        return await _forward(call, body, raw, path)

    def _upstream_body(body: dict[str, Any], raw: bytes, call: CallState, engine: EngineState) -> bytes:
        """The body sent to the engine: the client's bytes when nothing changes (re-encoding a
        10k-token prompt costs about as much as parsing it), else re-encoded with the engine's
        model name and the call's priority."""
        if not cfg.pass_priority and body.get("model") == engine.spec.model_name:
            return raw
        out = dict(body)
        out["model"] = engine.spec.model_name
        if cfg.pass_priority:
            out["priority"] = int(call.deadline_s * 1000)  # vLLM: lower runs first
        return msgspec.json.encode(out)

    def _rejected(exc: Exception) -> Response:
        """The answer to a call the gateway could not place: full queue, no engine, shutting down."""
        if isinstance(exc, QueueFull):
            gateway.metrics.rejected.labels("queue_full").inc()
            return _error(429, f"every engine's queue is full ({exc}); retry later", "rate_limit_error",
                          {"Retry-After": str(cfg.retry_after_s)})
        if isinstance(exc, NoEngine):
            gateway.metrics.rejected.labels("no_engine").inc()
            return _error(503, "no healthy engine; retry later", "unavailable", {"Retry-After": str(cfg.retry_after_s)})
        gateway.metrics.rejected.labels("shutting_down").inc()
        return _shutting_down()

    async def _forward(call: CallState, body: dict[str, Any], raw: bytes, path: str) -> Response:
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
                    sent_s = time.perf_counter()
                    resp = await gateway.pools[engine.engine_id].fetch(
                        "POST", path, _upstream_body(body, raw, call, engine), timeout_s=cfg.upstream_timeout_s)
                    upstream_s = time.perf_counter() - sent_s
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
                if ok:
                    gateway.metrics.answered.labels(engine.name).inc()
                return Response(resp.body, status_code=resp.status,
                                media_type=resp.headers.get("content-type", "application/json"),
                                headers={"X-Agentsched-Engine": engine.name,
                                         "X-Agentsched-Upstream-S": f"{upstream_s:.6f}",
                                         "X-Agentsched-Predicted-Hit-Tokens": str(call.predicted_hit_tokens)})
            gateway.metrics.rejected.labels("attempts_exhausted").inc()
            return _error(502, f"call failed on {call.attempts} attempts; engines unavailable", "upstream_error")
        finally:
            gateway.call_finished(call, ok)

    async def _forward_stream(call: CallState, body: dict[str, Any], raw: bytes, path: str) -> Response:
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
                upstream = await pool.request("POST", path, _upstream_body(body, raw, call, engine),
                                              timeout_s=cfg.upstream_timeout_s)
                chunks = upstream.chunks()
                first = await chunks.__anext__()
            except (UpstreamError, StopAsyncIteration) as exc:
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
                if ok:
                    gateway.metrics.answered.labels(engine.name).inc()
                gateway.call_finished(call, ok)

            async def relay(first=first, chunks=chunks, upstream=upstream, engine=engine,
                            finish=finish) -> AsyncIterator[bytes]:
                ok = False
                # Relay whole SSE events only: if the stream breaks, a half-sent event is dropped
                # and the error event starts on a clean line. The answer counts as complete once `[DONE]` is passed on, even if the client
                # hangs up right after reading it (the generator is then closed at that yield).
                tail = first
                served = upstream.status < 400
                try:
                    async for chunk in chunks:
                        tail += chunk
                        cut = tail.rfind(b"\n\n") + 2
                        if cut > 1:
                            piece, tail = tail[:cut], tail[cut:]
                            ok = ok or (served and b"data: [DONE]" in piece)
                            yield piece
                    ok = served
                    if tail:
                        yield tail
                except UpstreamError as exc:
                    if ok:  # broke after [DONE]: the client has its whole answer
                        return
                    # bytes already reached the client, so the call cannot be retried elsewhere:
                    # end the stream the OpenAI way, so that clients see an error, not a short answer
                    log.warning("stream from %s broke after first byte: %s", engine.name, exc)
                    gateway.metrics.rejected.labels("stream_broken").inc()
                    yield stream_error_event(f"engine {engine.name} failed during the stream; the answer is "
                                             "incomplete, send the call again")
                finally:
                    finish(ok)

            stream = relay()
            # a client that disconnects before the body starts leaves the generator unstarted, so
            # its `finally` never runs: free the slot when the generator is dropped instead
            weakref.finalize(stream, finish, False).atexit = False
            return StreamingResponse(stream, status_code=upstream.status,
                                     media_type=upstream.headers.get("content-type", "text/event-stream"),
                                     headers={"X-Agentsched-Engine": engine.name,
                                              "X-Agentsched-Predicted-Hit-Tokens": str(call.predicted_hit_tokens)})
        gateway.call_finished(call, False)
        return _error(502, f"stream failed on {call.attempts} attempts; engines unavailable", "upstream_error")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _proxy(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _proxy(request, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "owned_by": "agentsched"}
                                                        for n in model_names]})

    @app.get("/health")
    async def health() -> Response:
        """200 `ok` with every engine up, 200 `degraded` (and the down engines) while at least one
        serves, 503 `down` when none does."""
        up = [e.name for e in gateway.state.engines if e.healthy]
        down = [e.name for e in gateway.state.engines if not e.healthy]
        status = "ok" if not down else ("degraded" if up else "down")
        return JSONResponse({"status": status, "engines_up": up, "engines_down": down},
                            status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/agentsched/info")
    async def info() -> Response:
        return JSONResponse(gateway.info())

    return FastPath(app, {"/v1/completions": completions, "/v1/chat/completions": chat_completions},
                    api_key=api_key, metrics_key=metrics_key)
