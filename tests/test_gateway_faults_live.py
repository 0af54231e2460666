"""Fault injection on live vLLM CPU engines: an engine is killed while calls are in flight on it.

Asserts, from the gateway's own state and the replay's records: calls were in flight on the
killed engine at the moment of the kill, every workflow of the replay finishes, no call is
answered twice, and no streamed answer is cut short without the gateway's error event.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.deploy_fixtures import thread_gateway

pytestmark = pytest.mark.engines

VICTIM = "slow"


def _answered(metrics_text: str) -> dict[str, float]:
    return {line.split('"')[1]: float(line.split()[-1]) for line in metrics_text.splitlines()
            if line.startswith("agentsched_answered_calls_total{")}


def test_engine_killed_with_calls_in_flight_loses_nothing(live_cluster, tmp_path):
    from deploy.replay import ReplayConfig, Replayer
    from policies import load_policy

    cluster = live_cluster.cluster(tmp_path, health_interval_s=0.3)
    queries = 8
    result: dict = {}
    replayer_box: list[Replayer] = []
    try:
        with thread_gateway(cluster, load_policy("rr")) as gw:
            victim = next(e for e in gw.gateway.state.engines if e.name == VICTIM)

            def run_replay() -> None:
                import asyncio

                replayer = Replayer(ReplayConfig(gateway=gw.url, trace="chess_trace1", rate_qps=2.0, slo_scale=3.0,
                                                 token_scale=0.05, queries=queries, seed=3, stream=True))
                replayer_box.append(replayer)
                result.update(asyncio.run(replayer.run()))

            t = threading.Thread(target=run_replay)
            t.start()
            # kill the engine only once the gateway has calls in flight on it (its own accounting)
            deadline = time.monotonic() + 60
            while victim.inflight < 2:
                assert time.monotonic() < deadline and t.is_alive(), "no calls ever in flight on the victim"
                time.sleep(0.005)
            inflight_at_kill = victim.inflight
            live_cluster.kill(VICTIM)
            t.join(timeout=300)
            assert not t.is_alive(), "replay did not finish"
            metrics = httpx.get(gw.url + "/metrics").text
            info = httpx.get(gw.url + "/v1/agentsched/info").json()
    finally:
        live_cluster.restart(VICTIM)  # the session's other tests need both engines
    replayer = replayer_box[0]
    assert inflight_at_kill >= 2
    assert next(e for e in info["engines"] if e["name"] == VICTIM)["healthy"] is False
    # every workflow finished, every call has exactly one record with a complete answer
    assert result["n_workflows"] == queries and result["n_finished"] == queries and result["n_failed"] == 0
    keys = Counter((c.workflow_id, c.call_id) for c in replayer.calls)
    assert all(n == 1 for n in keys.values()) and len(keys) == result["n_calls"]
    assert all(not math.isnan(c.finish_s) for c in replayer.calls)
    # no call answered twice: the gateway answered exactly as many complete calls as the replay made
    answered = _answered(metrics)
    assert sum(answered.values()) == len(replayer.calls), (answered, len(replayer.calls))
    # the calls that were in flight on the victim were either retried before their first byte or
    # ended with an error event; none was cut short silently
    assert replayer.streams_truncated == 0
    retried = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("agentsched_retried_calls_total{") and f'"{VICTIM}"' in line)
    broken = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('agentsched_rejected_calls_total{reason="stream_broken"}'))
    assert retried + broken >= 1 and broken == replayer.stream_error_events
    assert all(c.output_tokens >= 1 for c in replayer.calls)
