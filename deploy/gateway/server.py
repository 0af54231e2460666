"""Run the gateway under uvicorn (uvloop + httptools when installed: about 2x the throughput).

Shutdown (SIGTERM or SIGINT; `GatewayServer`, over uvicorn's `timeout_graceful_shutdown`): the
listener closes, queued calls and calls waiting for a healthy engine are answered 503 at once
(`Gateway.begin_shutdown`), calls already sent to an engine get `gateway.shutdown_grace_s` to
finish, then their upstream connections are aborted and they are answered 503 too; the scrape,
health, control and gc loops stop and every upstream connection is closed. The process exits 0.
A second signal skips the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import os
import signal
import socket
import threading
import time

import uvicorn

from deploy.cluster import Cluster
from deploy.gateway.app import build_app
from deploy.gateway.core import Gateway
from envs.sim.errors import UserError
from policies import load_policy
from policies.base import Policy

log = logging.getLogger("agentsched.gateway")

SHUTDOWN_GRACE_S = 5.0  # default of the cluster file's gateway.shutdown_grace_s
LEFTOVER_TIMEOUT_S = 1.0  # after the grace period and the upstream abort: cancel what is left
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def freeze_startup_heap() -> None:
    """Move everything allocated at start-up (FastAPI, pydantic, numpy, the policy: ~65k objects)
    out of the garbage collector's reach. Without it every full (generation 2) collection walks
    that heap: 60-80 ms on the loaded 2-core box, during which the event loop serves no call (the
    gateway's 100+ ms stalls). Objects created later are collected as usual."""
    gc.collect()
    gc.freeze()


def resolve_policy(name_or_path: str) -> Policy:
    """`policies.load_policy` (heuristic names, tuned policy files, trained policies)."""

    return load_policy(name_or_path)


class StallWatchdog:
    """Debug aid (`AGENTSCHED_STALL_MS=50 agentsched serve ...`): a thread that logs the event
    loop thread's stack whenever the loop has not run a 5 ms heartbeat for longer than the
    threshold, i.e. whenever something blocks the loop. Works with uvloop (unlike asyncio's debug
    mode). Stalls are also counted in `stalls`."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self.beat = time.monotonic()
        self.stalls = 0
        self._stop = threading.Event()
        self._loop_thread = threading.get_ident()

    async def heartbeat(self) -> None:
        self._loop_thread = threading.get_ident()
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()
        try:
            while True:
                self.beat = time.monotonic()
                await asyncio.sleep(0.005)
        finally:
            self._stop.set()

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
            return
        spent = time.perf_counter() - getattr(self, "_gc_t0", time.perf_counter())
        if spent > self.threshold_s / 4:
            log.warning("garbage collection of generation %s took %.1f ms (collected %s)",
                        info.get("generation"), spent * 1e3, info.get("collected"))

    def _watch(self) -> None:
        import sys
        import traceback

        reported = 0.0
        while not self._stop.wait(self.threshold_s / 4):
            late = time.monotonic() - self.beat
            if late > self.threshold_s and self.beat != reported:
                reported = self.beat
                self.stalls += 1
                frame = sys._current_frames().get(self._loop_thread)
                # innermost frames; only uvloop/typer frames means the loop was not running Python
                # (the process was descheduled, or a C call blocked)
                stack = "".join(traceback.format_list(traceback.extract_stack(frame)[-8:])) if frame else "?"
                log.warning("event loop blocked for %.0f ms so far; loop thread at:\n%s", late * 1e3, stack)


class GatewayServer(uvicorn.Server):
    """uvicorn.Server that drains the gateway on SIGTERM/SIGINT, with uvicorn's own graceful
    shutdown (`timeout_graceful_shutdown`) doing the waiting.

    On the first signal (`handle_exit`, chained to uvicorn's): queued and engine-waiting calls are
    answered 503 at once (`Gateway.begin_shutdown`) and a timer aborts the upstream connections of
    calls still in flight after `grace_s`, so they answer 503 too instead of holding the process
    for `upstream_timeout_s`; uvicorn meanwhile stops listening and waits for those answers (up to
    `grace_s + LEFTOVER_TIMEOUT_S`, then cancels what is left). A second signal aborts them at
    once. Exit status 0: `run_gateway` installs its own handlers, which uvicorn's re-raised signal
    then reaches.
    """

    def __init__(self, config: uvicorn.Config, gateway, grace_s: float = SHUTDOWN_GRACE_S,  # noqa: ANN001
                 freeze_gc: bool = False) -> None:
        super().__init__(config)
        self.gateway = gateway  # deploy.gateway.core.Gateway
        self.grace_s = grace_s
        self.freeze_gc = freeze_gc
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            config = self.config
            log.warning("agentsched gateway listening on http://%s:%d (policy %s, %d engines)", config.host,
                        config.port, self.gateway.policy.spec().get("name", "?"), len(self.gateway.state.engines))
        if self.freeze_gc:
            freeze_startup_heap()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        watchdog_task = None
        stall_ms = os.environ.get("AGENTSCHED_STALL_MS")
        if stall_ms:
            watchdog = StallWatchdog(float(stall_ms) / 1e3)
            watchdog_task = asyncio.create_task(watchdog.heartbeat())
            gc.callbacks.append(watchdog.on_gc)
        try:
            await super().serve(sockets)
        finally:
            if watchdog_task is not None:
                watchdog_task.cancel()

    def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.drain, first)

    def drain(self, first: bool = True) -> None:
        """Refuse queued calls now; abort upstream calls after the grace period (at once if not `first`)."""
        self.gateway.begin_shutdown()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        delay = self.grace_s if first else 0.0
        self._abort_timer = asyncio.get_running_loop().call_later(
            delay, lambda: asyncio.ensure_future(self._abort_upstream()))

    async def _abort_upstream(self) -> None:
        if self.server_state.tasks:
            log.warning("shutting down: aborting the upstream calls of %d requests still in flight",
                        len(self.server_state.tasks))
        for pool in self.gateway.pools:
            await pool.abort()


def server_config(app, host: str, port: int, log_level: str, loop: str | None = None,  # noqa: ANN001
                  grace_s: float = SHUTDOWN_GRACE_S) -> uvicorn.Config:
    fast_loop = importlib.util.find_spec("uvloop") is not None
    fast_http = importlib.util.find_spec("httptools") is not None
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          loop=loop or ("uvloop" if fast_loop else "asyncio"),
                          http="httptools" if fast_http else "h11",
                          timeout_keep_alive=60, backlog=4096,
                          timeout_graceful_shutdown=grace_s + LEFTOVER_TIMEOUT_S)


METRICS_KEY_ENV = "AGENTSCHED_METRICS_KEY"  # optional key for /metrics alone (Prometheus' bearer token)


def run_gateway(cluster: Cluster, policy: Policy, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, log_level: str = "warning", metrics_key: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT. `metrics_key` (default: the AGENTSCHED_METRICS_KEY environment
    variable) lets `/metrics` be scraped without the API key."""

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    gateway = Gateway(cluster, policy)
    app = build_app(gateway, api_key=api_key, metrics_key=metrics_key or os.environ.get(METRICS_KEY_ENV) or None)
    grace_s = cluster.gateway.shutdown_grace_s
    server = GatewayServer(server_config(app, host, port, log_level, grace_s=grace_s), gateway,
                           grace_s=grace_s, freeze_gc=True)
    # uvicorn re-raises the signal that stopped it once it is done; these handlers receive it, so
    # that a requested stop ends with exit status 0 instead of death by SIGTERM
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in HANDLED_SIGNALS}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise UserError(f"the gateway could not listen on {host}:{port} (port in use? pick another with --port)")
