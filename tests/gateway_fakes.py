"""Fake vLLM engines for the gateway's fast unit tests (no live engine): a tiny aiohttp server on
loopback, in its own thread, that speaks the few endpoints the gateway uses (/health, /metrics,
/v1/completions, streamed or not). Tests steer it: hold calls, fail health checks, break streams.

Only the fast tests use it; everything that claims the deploy path works against vLLM runs on
live engines (tests/test_deploy_live.py, tests/test_gateway_faults_live.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from aiohttp import web

from tests.deploy_fixtures import free_port

STEPS = ("Information Retriever", "extract_keywords", "generate_candidate", "revise", "unit_tester",
         "generate_unit_test", "evaluate")


class FakeEngine:
    """One fake engine. `healthy=False` makes /health and /metrics answer 503; `hold` (a
    threading.Event, cleared) keeps completions waiting until set; `break_stream_after` closes
    streamed answers abruptly after that many events."""

    def __init__(self, name: str, kv_usage: float = 0.25) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.healthy = True
        self.kv_usage = kv_usage
        self.release = threading.Event()
        self.release.set()
        self.break_stream_after: int | None = None
        self.fail_before_first_byte = False
        self.received = 0
        self.active = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/chat/completions", self._completion)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> "FakeEngine":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self.healthy:
            return web.Response(status=503)
        text = (f'vllm:num_requests_running{{engine="0",model_name="tiny"}} {self.active}.0\n'
                f'vllm:num_requests_waiting{{engine="0",model_name="tiny"}} 0.0\n'
                f'vllm:kv_cache_usage_perc{{engine="0",model_name="tiny"}} {self.kv_usage}\n'
                'vllm:cache_config_info{block_size="16",engine="0",kv_cache_size_tokens="4096"} 1.0\n')
        return web.Response(text=text)

    async def _wait_release(self) -> None:
        while not self.release.is_set():
            await asyncio.sleep(0.005)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received += 1
        self.active += 1
        try:
            await self._wait_release()
            n = int(body.get("max_tokens", 4))
            if self.fail_before_first_byte:
                return web.Response(status=503, text="engine overloaded")
            if not body.get("stream"):
                return web.json_response({"id": "cmpl", "object": "text_completion", "model": body.get("model"),
                                          "engine": self.name, "choices": [{"index": 0, "text": " x" * n}],
                                          "usage": {"prompt_tokens": 4, "completion_tokens": n}})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(n):
                if self.break_stream_after is not None and i == self.break_stream_after:
                    # half an event, then the connection dies (an engine crash mid-stream)
                    await resp.write(b'data: {"choices":[{"text":" trunc')
                    request.transport.abort()
                    return resp
                await resp.write(b'data: {"choices":[{"index":0,"text":" x"}]}\n\n')
                await asyncio.sleep(0.002)
            await resp.write(b'data: {"choices":[],"usage":{"completion_tokens":%d}}\n\n' % n)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.active -= 1


def fake_cluster(path: Path, engines: list[FakeEngine], **gateway: object):
    """A cluster file over fake engines (explicit latency tables, no profile), loaded."""
    from deploy.cluster import load_cluster

    engine_specs = [{"name": e.name, "url": e.url, "gpu": f"fake-{i}", "model": "tiny",
                     "latency_s": {s: 0.1 * (i + 1) for s in STEPS}} for i, e in enumerate(engines)]
    data = {"name": "fake", "workdir": str(path / "work"), "engines": engine_specs,
            "gateway": {"health_interval_s": 0.1, **gateway}}
    file = path / "cluster.json"
    file.write_text(json.dumps(data))
    return load_cluster(file)
