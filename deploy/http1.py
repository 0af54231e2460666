"""A minimal asyncio HTTP/1.1 client with keep-alive connection pools, for the gateway's hot path.

Why not httpx: on a 2-core box httpx costs several hundred microseconds of CPU per request, which
alone would break the gateway's 2 ms p99 added-latency goal at 1000 req/s. The gateway only ever
talks to known vLLM engines (uvicorn behind), with JSON bodies, Content-Length or chunked
responses, so a small client that parses exactly that is enough. Anything unusual raises
`UpstreamError` and the gateway retries elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024


class UpstreamError(Exception):
    """The upstream could not be reached or answered with something we cannot parse."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


IDLE_REUSE_S = 3.0  # uvicorn (vLLM's server) closes keep-alive connections idle for 5 s


class _Conn:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a broken socket may fail in many ways
            pass


class StreamingResponse:
    """Headers are read; iterate `chunks()` for the body; `release()` when done (always)."""

    def __init__(self, pool: "ConnectionPool", conn: _Conn, status: int, headers: dict[str, str]) -> None:
        self._pool = pool
        self._conn = conn
        self.status = status
        self.headers = headers
        self._done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readline()
                if not size_line:
                    raise UpstreamError("connection closed inside a chunked body")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()  # trailer end
                    break
                data = await reader.readexactly(size)
                await reader.readexactly(2)
                yield data
        elif "content-length" in self.headers:
            remaining = int(self.headers["content-length"])
            while remaining > 0:
                data = await reader.read(min(remaining, READ_CHUNK_BYTES))
                if not data:
                    raise UpstreamError("connection closed before the body ended")
                remaining -= len(data)
                yield data
        else:  # body until close
            while True:
                data = await reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                yield data
            self.headers["connection"] = "close"
        self._done = True

    def release(self) -> None:
        """Return the connection to the pool if the body was fully read and keep-alive holds."""
        if self._conn is None:
            return
        if self._done and self.headers.get("connection", "").lower() != "close":
            self._pool._put(self._conn)
        else:
            self._pool._busy.discard(self._conn)
            self._conn.close()
        self._conn = None  # type: ignore[assignment]


class ConnectionPool:
    """Keep-alive connections to one upstream origin (http://host:port)."""

    def __init__(self, base_url: str, max_idle: int = 256, connect_timeout_s: float = 2.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// upstreams are supported, got {base_url}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.host_header = f"{self.host}:{self.port}".encode()
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self._idle: deque[_Conn] = deque()
        self._busy: set[_Conn] = set()  # checked out (a request in progress); close() aborts them
        self.closed = False

    def _put(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        if not self.closed and len(self._idle) < self.max_idle and not conn.reader.at_eof():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def _take_idle(self) -> _Conn | None:
        """Most recently used live connection; stale ones (server may have closed them) are dropped."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < IDLE_REUSE_S and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Conn:
        if self.closed:
            raise UpstreamError(f"connection pool to {self.host}:{self.port} is closed")
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (stuck shutdown)
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEADER_BYTES)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from None
        return _Conn(reader, writer)

    def close_idle(self) -> None:
        while self._idle:
            self._idle.popleft().close()

    def close(self) -> None:
        """Close idle connections and abort those in use (their requests fail with UpstreamError)."""
        self.closed = True
        self.close_idle()
        while self._busy:
            self._busy.pop().close()

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> StreamingResponse:
        """Send a request; return once the response headers arrived (body not yet read).

        A reused keep-alive connection may have been closed by the server meanwhile; that case
        is retried once on a fresh connection, which is safe because nothing was processed.
        """
        head = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self.host_header,
                b"Content-Length: " + str(len(body)).encode()]
        if body:
            head.append(b"Content-Type: application/json")
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}".encode())
        payload = b"\r\n".join(head) + b"\r\n\r\n" + body
        for attempt in range(2):
            conn = self._take_idle() if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            self._busy.add(conn)
            try:
                conn.writer.write(payload)
                status_line = await conn.reader.readline()
                if not status_line:
                    raise ConnectionResetError("closed before status line")
                parts = status_line.split(b" ", 2)
                status = int(parts[1])
                hdrs: dict[str, str] = {}
                while True:
                    line = await conn.reader.readline()
                    if line in (b"\r\n", b"\n"):
                        break
                    if not line:
                        raise ConnectionResetError("closed inside headers")
                    name, _, value = line.decode("latin-1").partition(":")
                    hdrs[name.strip().lower()] = value.strip()
                return StreamingResponse(self, conn, status, hdrs)
            except (OSError, ConnectionResetError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                self._busy.discard(conn)
                conn.close()
                if reused and attempt == 0:
                    self.close_idle()  # its siblings are likely stale too
                    continue
                raise UpstreamError(f"{method} {self.host}:{self.port}{path} failed: {exc!r}") from None
        raise UpstreamError("unreachable")  # pragma: no cover

    async def fetch(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                    timeout_s: float | None = None) -> Response:
        """Request and read the whole body."""

        async def run() -> Response:
            resp = await self.request(method, path, body, headers)
            try:
                data = b"".join([c async for c in resp.chunks()])
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                raise UpstreamError(f"reading body from {self.host}:{self.port}{path} failed: {exc!r}") from None
            finally:
                resp.release()
            return Response(resp.status, resp.headers, data)

        if timeout_s is None:
            return await run()
        try:
            async with asyncio.timeout(timeout_s):
                return await run()
        except TimeoutError:
            raise UpstreamError(f"{method} {self.host}:{self.port}{path} timed out after {timeout_s}s") from None
