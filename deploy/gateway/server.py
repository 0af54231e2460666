"""Run the gateway under uvicorn (uvloop + httptools when installed: about 2x the throughput)."""

from __future__ import annotations

import importlib.util
import logging

from deploy.cluster import Cluster
from policies.base import Policy


def resolve_policy(name_or_path: str) -> Policy:
    """`policies.load_policy` (heuristic names, tuned policy files, trained policies)."""
    from policies import load_policy

    return load_policy(name_or_path)


def run_gateway(cluster: Cluster, policy: Policy, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, log_level: str = "warning") -> None:
    import uvicorn

    from deploy.gateway.app import build_app
    from deploy.gateway.core import Gateway

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = build_app(Gateway(cluster, policy), api_key=api_key)
    fast_loop = importlib.util.find_spec("uvloop") is not None
    fast_http = importlib.util.find_spec("httptools") is not None
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                loop="uvloop" if fast_loop else "asyncio", http="httptools" if fast_http else "h11",
                timeout_keep_alive=60, backlog=4096)
