"""Stopping things cleanly, without engines: `agentsched serve` on SIGTERM/SIGINT and `engines down`.

The gateway starts fine with its engines unreachable (it marks them down and keeps probing), so a
real `agentsched serve` subprocess can be signalled here in a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy_fixtures import REPO, free_port

AGENTSCHED = REPO / ".venv" / "bin" / "agentsched"
EXIT_WITHIN_S = 5.0


def _cluster(tmp_path: Path, engine_url: str, **gateway: object) -> Path:
    path = tmp_path / "cluster.json"  # JSON is YAML
    path.write_text(json.dumps({"name": "t", "workdir": str(tmp_path / "work"), "engines": [
        {"name": "a", "url": engine_url, "gpu": "A100"}], "gateway": gateway}))
    return path


def _serve(cluster: Path, port: int) -> subprocess.Popen:
    exe = [str(AGENTSCHED)] if AGENTSCHED.exists() else [sys.executable, "-m", "agentsched"]
    proc = subprocess.Popen([*exe, "serve", "--cluster", str(cluster), "--policy", "rr", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)


def _post_in_background(url: str, n: int) -> tuple[list[threading.Thread], list]:
    results: list = []

    def call() -> None:
        try:
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
            results.append((r.status_code, r.json()["error"]["message"] if r.status_code != 200 else ""))
        except httpx.HTTPError as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _wait_engines_down(url: str) -> None:
    """Until the gateway's health checks have marked every engine down."""
    deadline = time.monotonic() + 20
    while any(e["healthy"] for e in httpx.get(url + "/v1/agentsched/info", timeout=5).json()["engines"]):
        assert time.monotonic() < deadline, "the unreachable engine was never marked down"
        time.sleep(0.05)


def _wait_open_calls(url: str, n: int) -> None:
    """Until the gateway has registered n calls (their workflows are open): no sleep-and-hope."""
    deadline = time.monotonic() + 20
    while httpx.get(url + "/v1/agentsched/info", timeout=5).json()["workflows_open"] < n:
        assert time.monotonic() < deadline, "calls never reached the gateway"
        time.sleep(0.05)
    time.sleep(0.2)  # and are waiting (for an engine, or upstream)


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, float]:
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=EXIT_WITHIN_S + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"gateway ignored signal {sig}: still running after {EXIT_WITHIN_S + 10} s")
    return code, time.monotonic() - t0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_exits_0_on_signal_and_fails_waiting_calls(tmp_path, sig):
    """Engines unreachable: calls wait for a healthy engine (60 s by default); a signal answers them 503."""
    port = free_port()
    proc = _serve(_cluster(tmp_path, f"http://127.0.0.1:{free_port()}"), port)
    try:
        _wait_engines_down(f"http://127.0.0.1:{port}")  # else calls race the first health probe and fail fast
        threads, results = _post_in_background(f"http://127.0.0.1:{port}", 2)
        _wait_open_calls(f"http://127.0.0.1:{port}", 2)  # the calls are now waiting for an engine
    except BaseException:
        proc.kill()  # never leave a gateway behind when the set-up fails
        raise
    code, took = _stop(proc, sig)
    for t in threads:
        t.join(10)
    output = proc.stdout.read() if proc.stdout else ""
    assert code == 0, output
    assert took < EXIT_WITHIN_S, (took, output)
    assert len(results) == 2 and all(r[0] == 503 and "shutting down" in r[1] for r in results), (results, output)


@pytest.mark.parametrize("grace_s,signals", [(0.5, 1), (60.0, 2)])
def test_serve_aborts_calls_stuck_upstream_after_grace(tmp_path, grace_s, signals):
    """An engine that accepts and never answers: in-flight calls get `shutdown_grace_s`, then 503;
    a second signal skips the grace period."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = free_port()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    proc = _serve(_cluster(tmp_path, url, shutdown_grace_s=grace_s, unhealthy_after_failures=1000), port)
    try:
        threads, results = _post_in_background(f"http://127.0.0.1:{port}", 2)
        _wait_open_calls(f"http://127.0.0.1:{port}", 2)
        if signals == 2:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        code, took = _stop(proc, signal.SIGTERM)
        for t in threads:
            t.join(10)
    finally:
        stop.set()
        acceptor.join(2)
        for s in held:
            s.close()
        listener.close()
    assert code == 0 and took < EXIT_WITHIN_S, (code, took)
    assert len(results) == 2 and all(r[0] == 503 and "shutting down" in r[1] for r in results), results


def test_engines_down_kills_group_that_ignores_sigterm_and_orphans(tmp_path):
    """A stand-in 'engine' (its argv names vLLM's server module) ignores SIGTERM and has a child
    that outlives it: `engines down` stops the whole group and removes the pid file."""
    from deploy.cluster import load_cluster
    from deploy.engines import engines_down, group_members, pid_path

    data = {"name": "t", "workdir": str(tmp_path / "work"), "engines": [
        {"name": "e", "gpu": "A100", "launch": {"model_dir": str(tmp_path), "port": free_port(), "cpu_bind": "0"}}]}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data))
    cluster = load_cluster(path)
    spec = cluster.engines[0]
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "time.sleep(60)']); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, "vllm.entrypoints.openai.api_server"], start_new_session=True)
    pid_path(cluster, spec).parent.mkdir(parents=True, exist_ok=True)
    pid_path(cluster, spec).write_text(str(proc.pid))
    deadline = time.monotonic() + 10
    while len(group_members(proc.pid)) < 2:
        assert time.monotonic() < deadline, "stand-in engine did not start its child"
        time.sleep(0.05)
    t0 = time.monotonic()
    assert engines_down(cluster, grace_s=0.5) == ["e"]
    assert time.monotonic() - t0 < 5
    proc.wait(5)
    assert group_members(proc.pid) == []
    assert not pid_path(cluster, spec).exists()
    assert engines_down(cluster) == []  # nothing left: idempotent
    # a stale pid file pointing at an unrelated live process (pid reuse) is never signalled
    pid_path(cluster, spec).write_text(str(os.getpid()))
    assert engines_down(cluster) == []
