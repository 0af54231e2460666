"""The gateway's HTTP client to its engines (and replay's/calibration's to a gateway or engine):
aiohttp's `ClientSession` with a keep-alive connection pool per origin, plus the one SSE reader.

Why aiohttp: it is a maintained HTTP/1.1 client whose per-request CPU cost keeps the gateway's
added p99 well under its 2 ms goal (`benchmarks/gateway_overhead.py`; httpx costs several times
as much). What it gives that a hand-written client got wrong:
- a cancelled request (client hang-up, shutdown) releases or closes its connection;
- a request on a reused keep-alive connection that the server closed meanwhile is retried by
  aiohttp only for idempotent methods: a POST is never silently sent twice;
- one `ClientTimeout` covers connect, headers and the whole body, for streamed and non-streamed
  calls alike.

Keep-alive connections idle longer than `KEEPALIVE_S` are dropped: vLLM's uvicorn closes idle
connections after 5 s, and reusing one just as the server closes it fails the request.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import AsyncIterator, Callable
from urllib.parse import urlsplit

import aiohttp

KEEPALIVE_S = 3.0  # below uvicorn's (vLLM's) 5 s keep-alive timeout
JSON_HEADERS = {"Content-Type": "application/json"}


class UpstreamError(Exception):
    """The upstream could not be reached, timed out, or broke the connection."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


def _headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.headers.items()}


class StreamingResponse:
    """Headers are read; iterate `chunks()` for the body; `release()` when done (always; idempotent)."""

    def __init__(self, resp: aiohttp.ClientResponse, what: str) -> None:
        self._resp = resp
        self._what = what
        self.status = resp.status
        self.headers = _headers(resp)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._resp.content.iter_any():
                yield data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamError(f"reading the body of {self._what} failed: {exc!r}") from None

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def release(self) -> None:
        """Back to the pool when the body was read to its end; otherwise the connection is closed."""
        self._resp.release()


class Upstream:
    """Keep-alive connections to one origin (http://host:port), created in the running event loop."""

    def __init__(self, base_url: str, connect_timeout_s: float = 2.0, timeout_s: float | None = None,
                 limit: int = 0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be like http://host:port, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.limit = limit  # 0: no cap on connections (the gateway caps calls per engine itself)
        self._session: aiohttp.ClientSession | None = None
        self.closed = False

    def _timeout(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=timeout_s if timeout_s is not None else self.timeout_s,
                                     sock_connect=self.connect_timeout_s)

    def session(self) -> aiohttp.ClientSession:
        if self.closed:
            raise UpstreamError(f"client to {self.base_url} is closed")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.limit, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=None)
            self._session = aiohttp.ClientSession(base_url=self.base_url, connector=connector, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent",), timeout=self._timeout(None))
        return self._session

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      timeout_s: float | None = None) -> StreamingResponse:
        """Send a request; return once the response headers arrived (the body not yet read).

        `timeout_s` bounds the whole exchange including reading the body, streamed or not."""
        what = f"{method} {self.base_url}{path}"
        hdrs = {**JSON_HEADERS, **headers} if body and headers else (JSON_HEADERS if body else headers)
        try:
            resp = await self.session().request(method, path, data=body or None, headers=hdrs,
                                                timeout=self._timeout(timeout_s), allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamError(f"{what} failed: {exc!r}") from None
        return StreamingResponse(resp, what)

    async def fetch(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                    timeout_s: float | None = None) -> Response:
        """Request and read the whole body."""
        resp = await self.request(method, path, body, headers, timeout_s)
        try:
            data = await resp.read()
        finally:
            resp.release()
        return Response(resp.status, resp.headers, data)

    async def abort(self) -> None:
        """Close every connection, those in use included: their requests fail with UpstreamError.
        The client stays usable (new requests open new connections)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def close(self) -> None:
        self.closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


class StreamBroken(Exception):
    """A streamed answer ended without `[DONE]` or a final usage chunk (truncated)."""


class StreamErrorEvent(Exception):
    """The stream carried an OpenAI-style error event (`data: {"error": {...}}`)."""

    def __init__(self, error: dict) -> None:
        super().__init__(error.get("message", "stream error"))
        self.error = error


async def read_sse_completion(chunks: AsyncIterator[bytes], clock: Callable[[], float],
                              on_event: Callable[[float], None] | None = None) -> tuple[float, dict]:
    """Consume an OpenAI SSE completion stream: (time of the first event with a choice, final usage).

    `on_event(t)` is called with the arrival time of every data event but `[DONE]` (calibration's
    token times). Only the first data event, usage chunks and error events are parsed as JSON, so
    the reader stays cheap at hundreds of tokens per second. Raises `StreamErrorEvent` on an error
    event and `StreamBroken` when the stream ends without `[DONE]` or usage."""
    first = math.nan
    usage: dict = {}
    done = False
    buf = b""
    async for chunk in chunks:
        buf += chunk
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            event, buf = buf[:end], buf[end + 2:]
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                now = clock()
                if on_event is not None:
                    on_event(now)
                if math.isnan(first) and (b'"choices":[{' in data or b'"choices": [{' in data):
                    first = now
                if data.startswith(b'{"error"'):
                    raise StreamErrorEvent(json.loads(data).get("error") or {})
                if b'"usage":{' in data or b'"usage": {' in data:
                    usage = json.loads(data).get("usage") or usage
    if not done and not usage:
        raise StreamBroken("stream ended without [DONE]")
    return first, usage


__all__ = ["Upstream", "UpstreamError", "Response", "StreamingResponse", "read_sse_completion", "StreamBroken",
           "StreamErrorEvent", "KEEPALIVE_S"]
