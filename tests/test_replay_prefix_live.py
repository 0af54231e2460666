"""Live: a replay with shared prompt segments on engines with automatic prefix caching on gets
prefix-cache hits, measured by the engines' own counters and written to the --out JSON."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from deploy.engines import engines_up_prefix_caching, prefix_caching_enabled
from deploy.replay import ReplayConfig, replay
from policies import load_policy
from tests.deploy_fixtures import thread_gateway

pytestmark = pytest.mark.engines


def test_replay_with_shared_segments_reports_the_engines_hit_rate(live_cluster, tmp_path):
    # the session's engines with prefix caching on (restarted only if they run with it off)
    engines_up_prefix_caching(live_cluster.session_cluster(), True, warmup=False)
    for e in live_cluster.data["engines"]:
        page = httpx.get(live_cluster.url(e["name"]) + "/metrics", timeout=10).text
        assert prefix_caching_enabled(page) is True
    with thread_gateway(live_cluster.cluster(tmp_path), load_policy("rr")) as gw:
        out = tmp_path / "r.json"
        replay(ReplayConfig(gateway=gw.url, trace="chess_trace1", rate_qps=2.0, slo_scale=3.0, token_scale=0.05,
                            queries=4, seed=0), out=out)
        shared = json.loads(out.read_text())
        # random prompts, the same calls: the counters see no hit beyond chance
        random_out = tmp_path / "random.json"
        replay(ReplayConfig(gateway=gw.url, trace="chess_trace1", rate_qps=2.0, slo_scale=3.0, token_scale=0.05,
                            queries=4, seed=0, prompt_segments=False), out=random_out)
        random = json.loads(random_out.read_text())
    assert shared["prefix_cache_counters"] == "engines" and shared["n_failed"] == 0
    # the counters' queries are the prompt tokens the replay sent (the gateway's scrapes add none)
    queries = sum(e["prefix_query_tokens"] for e in shared["engines"])
    assert queries == shared["prompt_tokens_sent"]
    assert 0.1 < shared["prefix_cache_hit_rate"] < 1.0
    assert all(not math.isnan(e["prefix_cache_hit_rate"]) for e in shared["engines"])
    assert random["prefix_cache_hit_rate"] < 0.02 < shared["prefix_cache_hit_rate"]
