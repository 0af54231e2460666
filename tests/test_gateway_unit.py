"""The gateway's request handling without live engines: header validation, workflow ids, model
names, API keys, /health, cluster-level load shedding, broken streams, recovery accounting.

The upstream engines are fakes (tests/gateway_fakes.py: a tiny aiohttp server on loopback) so these
run in seconds; the same paths against real vLLM engines are in tests/test_deploy_live.py and
tests/test_gateway_faults_live.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest

from deploy.gateway.core import parse_vllm_metrics
from policies.base import Policy
from tests.deploy_fixtures import free_port, thread_gateway
from tests.gateway_fakes import FakeEngine, fake_cluster


class AlwaysFirst(Policy):
    """Test policy: the first healthy engine, whatever its load (so its queue fills first)."""

    name = "test-always-first"

    def dispatch(self, call, cluster) -> int:
        return next(e.engine_id for e in cluster.engines if e.healthy)


def completion(**extra) -> dict:
    return {"model": "tiny", "prompt": "hello there", "max_tokens": 3, **extra}


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def one_engine(tmp_path):
    with FakeEngine("a") as engine:
        with thread_gateway(fake_cluster(tmp_path, [engine]), AlwaysFirst()) as gw:
            yield gw, engine


@pytest.mark.parametrize("header,value", [
    ("X-Workflow-SLO-S", "-5"), ("X-Workflow-SLO-S", "0"), ("X-Workflow-SLO-S", "nan"),
    ("X-Workflow-SLO-S", "inf"), ("X-Workflow-SLO-S", "soon"), ("X-Fanout", "-5"), ("X-Fanout", "0"),
    ("X-Fanout", "two"), ("X-Stage-Index", "-3"), ("X-Priority", "high"),
])
def test_bad_workflow_header_is_400_naming_it(one_engine, header, value):
    gw, engine = one_engine
    r = httpx.post(gw.url + "/v1/completions", json=completion(), headers={"X-Workflow-Id": "w", header: value})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert header in message and repr(value) in message
    assert engine.received == 0  # refused before any engine saw it


def test_good_headers_pass(one_engine):
    gw, _ = one_engine
    r = httpx.post(gw.url + "/v1/completions", json=completion(),
                   headers={"X-Workflow-Id": "w", "X-Workflow-SLO-S": "2.5", "X-Fanout": "3", "X-Stage-Index": "0",
                            "X-Priority": "-1"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("prompt", [[1, 2, True], [1, "two", 3], [], [1.5, 2]])
def test_bad_prompt_is_400_naming_the_field(one_engine, prompt):
    gw, engine = one_engine
    r = httpx.post(gw.url + "/v1/completions", json=completion(prompt=prompt))
    assert r.status_code == 400, r.text
    assert "'prompt'" in r.json()["error"]["message"]
    assert engine.received == 0


def test_token_id_prompts_are_served(one_engine):
    gw, engine = one_engine
    for prompt in ([5, 6, 7], [[5, 6, 7]], ["a", "b"]):
        assert httpx.post(gw.url + "/v1/completions", json=completion(prompt=prompt)).status_code == 200
    assert engine.received == 3


def test_reused_finished_workflow_id_is_409(one_engine):
    gw, _ = one_engine
    url = gw.url + "/v1/completions"
    assert httpx.post(url, json=completion(), headers={"X-Workflow-Id": "q1", "X-Workflow-Step": "revise"}).status_code == 200
    # still open: more calls join it
    assert httpx.post(url, json=completion(), headers={"X-Workflow-Id": "q1", "X-Workflow-Last": "1"}).status_code == 200
    r = httpx.post(url, json=completion(), headers={"X-Workflow-Id": "q1"})
    assert r.status_code == 409 and "X-Workflow-Id" in r.json()["error"]["message"]
    assert httpx.post(url, json=completion(), headers={"X-Workflow-Id": "q2"}).status_code == 200
    info = httpx.get(gw.url + "/v1/agentsched/info").json()
    assert info["workflows_finished"] == 1 and info["workflows_arrived"] == 2


def test_unknown_model_is_rejected_and_known_or_absent_model_served(one_engine):
    gw, engine = one_engine
    r = httpx.post(gw.url + "/v1/completions", json=completion(model="gpt-9"))
    assert r.status_code == 404 and "'model'" in r.json()["error"]["message"] and "tiny" in r.json()["error"]["message"]
    assert engine.received == 0
    body = completion()
    del body["model"]
    assert httpx.post(gw.url + "/v1/completions", json=body).status_code == 200
    assert httpx.post(gw.url + "/v1/completions", json=completion(model="tiny")).status_code == 200


def test_api_key_guards_every_endpoint_but_health(tmp_path):
    key, metrics_key = "s3cret", "scrape-only"
    with FakeEngine("a") as engine:
        from deploy.gateway.app import build_app  # noqa: F401 - thread_gateway builds it

        with thread_gateway(fake_cluster(tmp_path, [engine]), AlwaysFirst(), api_key=key,
                            metrics_key=metrics_key) as gw:
            with httpx.Client(base_url=gw.url, timeout=10) as client:
                endpoints = [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/agentsched/info"),
                             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/no-such-path")]
                for method, path in endpoints:
                    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                                    {"Authorization": f"Basic {key}"}):
                        r = client.request(method, path, headers=headers, json=completion())
                        assert r.status_code == 401, (method, path, headers, r.status_code)
                assert client.get("/health").status_code == 200
                for scheme in ("Bearer", "bearer", "BEARER"):
                    auth = {"Authorization": f"{scheme} {key}"}
                    assert client.get("/v1/models", headers=auth).status_code == 200
                    assert client.get("/v1/agentsched/info", headers=auth).status_code == 200
                    assert client.post("/v1/completions", headers=auth, json=completion()).status_code == 200
                    assert client.get("/metrics", headers=auth).status_code == 200
                scrape = {"Authorization": f"Bearer {metrics_key}"}
                assert client.get("/metrics", headers=scrape).status_code == 200
                assert client.get("/v1/agentsched/info", headers=scrape).status_code == 401
                assert client.post("/v1/completions", headers=scrape, json=completion()).status_code == 401


def test_health_degraded_lists_down_engines_and_clears_their_gauges(tmp_path):
    with FakeEngine("a", kv_usage=0.4) as a, FakeEngine("b", kv_usage=0.7) as b:
        with thread_gateway(fake_cluster(tmp_path, [a, b]), AlwaysFirst()) as gw:
            def engine(name: str) -> dict:
                return next(e for e in httpx.get(gw.url + "/v1/agentsched/info").json()["engines"] if e["name"] == name)

            wait_until(lambda: engine("b")["kv_usage"] == pytest.approx(0.7), what="first scrape")
            r = httpx.get(gw.url + "/health")
            assert r.status_code == 200 and r.json()["status"] == "ok"
            assert 'agentsched_engine_kv_usage{engine="b"} 0.7' in httpx.get(gw.url + "/metrics").text
            b.healthy = False
            wait_until(lambda: not engine("b")["healthy"], what="b marked down")
            r = httpx.get(gw.url + "/health")
            assert r.status_code == 200 and r.json() == {"status": "degraded", "engines_up": ["a"], "engines_down": ["b"]}
            state = engine("b")
            assert state["kv_usage"] == 0.0 and state["num_running"] == 0
            metrics = httpx.get(gw.url + "/metrics").text
            assert 'agentsched_engine_kv_usage{engine="b"}' not in metrics
            assert 'agentsched_engine_kv_usage{engine="a"} 0.4' in metrics
            a.healthy = False
            wait_until(lambda: not engine("a")["healthy"], what="a marked down")
            r = httpx.get(gw.url + "/health")
            assert r.status_code == 503 and r.json()["status"] == "down"
            b.healthy = True
            wait_until(lambda: engine("b")["healthy"], what="b back")
            assert httpx.get(gw.url + "/health").json()["status"] == "degraded"


def test_load_is_shed_by_the_cluster_not_by_the_chosen_engine(tmp_path):
    """The policy always picks `a`; once a's queue is full the calls go to `b` (the policy's next
    choice among engines with room), and only when both are full does the gateway answer 429."""
    queue_bound = 2
    with FakeEngine("a") as a, FakeEngine("b") as b:
        a.release.clear()
        b.release.clear()
        cluster = fake_cluster(tmp_path, [a, b], max_queue_per_engine=queue_bound, retry_after_s=2)
        cluster.engines[0].max_inflight = 1
        cluster.engines[1].max_inflight = 1
        with thread_gateway(cluster, AlwaysFirst()) as gw:
            capacity = 2 * (1 + queue_bound)  # per engine: 1 in flight + the queue

            async def flood() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                    async def one(i: int) -> httpx.Response:
                        await asyncio.sleep(0.02 * i)  # in order: a fills first
                        return await client.post("/v1/completions", json=completion())

                    async def release_when_full() -> None:
                        while True:
                            info = (await client.get("/v1/agentsched/info")).json()
                            if sum(e["inflight"] + e["queued"] for e in info["engines"]) >= capacity:
                                break
                            await asyncio.sleep(0.02)
                        await asyncio.sleep(0.3)  # the extra calls arrive while the cluster is full
                        peak.extend(info["engines"])
                        a.release.set()
                        b.release.set()

                    peak: list[dict] = []
                    responses = await asyncio.gather(*(one(i) for i in range(capacity + 3)), release_when_full())
                    return list(responses[:-1]), peak

            responses, peak = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert codes.count(200) == capacity, codes
    assert codes.count(429) == 3, codes
    assert all(r.headers["retry-after"] == "2" for r in responses if r.status_code == 429)
    assert "every engine" in next(r for r in responses if r.status_code == 429).json()["error"]["message"]
    served = [r.headers["x-agentsched-engine"] for r in responses if r.status_code == 200]
    assert served.count("a") == served.count("b") == 1 + queue_bound
    assert all(e["queued"] <= queue_bound for e in peak)  # queues stayed bounded


def test_stream_broken_after_first_byte_ends_with_error_event(tmp_path):
    with FakeEngine("a") as a:
        a.break_stream_after = 2
        with thread_gateway(fake_cluster(tmp_path, [a]), AlwaysFirst()) as gw:
            last = {"X-Workflow-Id": "wf-broken", "X-Workflow-Last": "1"}
            with httpx.stream("POST", gw.url + "/v1/completions", json=completion(stream=True, max_tokens=6),
                              headers=last) as s:
                assert s.status_code == 200
                events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
            # the failed last call did not finish its workflow: the client's retry is served, not 409
            a.break_stream_after = None
            r = httpx.post(gw.url + "/v1/completions", json=completion(), headers=last)
            assert r.status_code == 200, r.text
            assert httpx.post(gw.url + "/v1/completions", json=completion(), headers=last).status_code == 409
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]  # every relayed event is whole JSON (the half one is dropped)
    assert [p for p in payloads if "choices" in p] == [{"choices": [{"index": 0, "text": " x"}]}] * 2
    error = payloads[-1]["error"]
    assert "incomplete" in error["message"] and error["type"] == "upstream_error"


def test_stream_failing_before_first_byte_is_retried_elsewhere(tmp_path):
    with FakeEngine("a") as a, FakeEngine("b") as b:
        a.fail_before_first_byte = True
        with thread_gateway(fake_cluster(tmp_path, [a, b], unhealthy_after_failures=1000), AlwaysFirst()) as gw:
            with httpx.stream("POST", gw.url + "/v1/completions", json=completion(stream=True, max_tokens=3)) as s:
                assert s.status_code == 200 and s.headers["x-agentsched-engine"] == "b"
                events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    assert a.received == 1 and b.received == 1


def test_recovered_engine_does_not_take_every_call(tmp_path):
    """HexGen balances cumulative assigned work: without the rebase on recovery, the engine that
    was down would look idle and receive every call until it caught up with the other."""
    from policies import load_policy

    with FakeEngine("a") as a, FakeEngine("b") as b:
        with thread_gateway(fake_cluster(tmp_path, [a, b]), load_policy("hexgen")) as gw:
            def healthy(name: str) -> bool:
                return next(e for e in httpx.get(gw.url + "/v1/agentsched/info").json()["engines"]
                            if e["name"] == name)["healthy"]

            b.healthy = False
            wait_until(lambda: not healthy("b"), what="b down")
            with httpx.Client(base_url=gw.url, timeout=10) as client:
                for _ in range(30):  # a accumulates assigned work while b is away
                    assert client.post("/v1/completions", json=completion(),
                                       headers={"X-Workflow-Step": "generate_candidate"}).status_code == 200
                b.healthy = True
                wait_until(lambda: healthy("b"), what="b back")
                served = [client.post("/v1/completions", json=completion(),
                                      headers={"X-Workflow-Step": "generate_candidate"}).headers["x-agentsched-engine"]
                          for _ in range(12)]
    assert served.count("a") >= 3 and served.count("b") >= 3, served


def test_kv_usage_is_per_engine_core_not_summed():
    page = ('# TYPE vllm:kv_cache_usage_perc gauge\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.6\n'
            'vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.5\n'
            'vllm:num_requests_running{engine="0",model_name="tiny"} 3.0\n'
            'vllm:num_requests_running{engine="1",model_name="tiny"} 4.0\n'
            'vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="tiny"} 5.0\n')
    values = parse_vllm_metrics(page)
    assert values["vllm:kv_cache_usage_perc"] == pytest.approx(0.6)  # not 1.1
    assert values["vllm:num_requests_running"] == 7


def test_engines_up_restarts_an_engine_whose_api_server_died(tmp_path):
    """The API server (group leader) is gone but a child (EngineCore) keeps the group alive:
    `engines up` stops the orphaned group and starts anew instead of quoting the dead log."""
    from deploy.cluster import load_cluster
    from deploy.engines import group_members, pid_path, start_engine
    from envs.sim.errors import UserError

    data = {"name": "t", "workdir": str(tmp_path / "work"), "vllm_python": str(tmp_path / "no-venv" / "python"),
            "engines": [{"name": "e", "gpu": "A100", "launch": {"model_dir": str(tmp_path), "port": free_port(),
                                                                "cpu_bind": "0"}}]}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data))
    cluster = load_cluster(path)
    spec = cluster.engines[0]
    # a leader that starts a long-lived child in its group, then exits (the API server's crash)
    script = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "sys.exit(0)")
    leader = subprocess.Popen([sys.executable, "-c", script, "vllm.entrypoints.openai.api_server"],
                              start_new_session=True)
    leader.wait(10)
    pid_path(cluster, spec).parent.mkdir(parents=True, exist_ok=True)
    pid_path(cluster, spec).write_text(str(leader.pid))
    wait_until(lambda: len(group_members(leader.pid)) == 1, what="the orphan")
    with pytest.raises(UserError, match="vllm_python"):  # it went on to start a new engine
        start_engine(cluster, spec)
    assert group_members(leader.pid) == []  # the orphaned group was stopped


def test_serve_without_engines_says_where_it_listens_and_how_to_start_them(tmp_path, caplog):
    """No engine up: the gateway still listens, says so, and names the command that starts each engine."""
    data = {"name": "t", "workdir": str(tmp_path / "work"), "gateway": {"health_interval_s": 0.1}, "engines": [
        {"name": "local", "gpu": "A100", "launch": {"model_dir": str(tmp_path), "port": free_port(), "cpu_bind": "0"}},
        {"name": "remote", "gpu": "A100", "url": f"http://127.0.0.1:{free_port()}"}]}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data))
    from deploy.cluster import load_cluster

    caplog.set_level("WARNING", logger="agentsched.gateway")
    with thread_gateway(load_cluster(path), AlwaysFirst()) as gw:
        wait_until(lambda: httpx.get(gw.url + "/health").status_code == 503, what="both engines down")
    text = caplog.text
    assert f"listening on {gw.url}" in text
    assert f"engine local is DOWN (start it with `agentsched engines up --cluster {path.resolve()} --engine local`)" in text
    assert "engine remote is DOWN (is it running at http://127.0.0.1:" in text


class DeferFirstWorkflow(AlwaysFirst):
    """Test policy: defers the first workflow that arrives, admits every other."""

    name = "test-defer-first"

    def admit(self, call, cluster) -> bool:
        return call.workflow_id != 0


def test_deferred_workflow_is_background_work_as_in_the_simulator(tmp_path):
    """`Policy.admit` in the gateway: a deferred workflow's call waits while its engine serves a
    call of an admitted workflow (even with in-flight room), then goes; the simulator's rule."""
    with FakeEngine("a") as a:
        a.release.clear()
        cluster = fake_cluster(tmp_path, [a])
        cluster.engines[0].max_inflight = 4
        with thread_gateway(cluster, DeferFirstWorkflow()) as gw:

            async def run() -> tuple[list[httpx.Response], dict, dict]:
                async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                    def post(workflow: str) -> asyncio.Task:
                        return asyncio.ensure_future(client.post(
                            "/v1/completions", json=completion(), headers={"X-Workflow-Id": workflow}))

                    deferred = post("w-deferred")  # workflow 0: deferred, but the engine is idle: it goes
                    await asyncio.sleep(0.3)
                    first = (await client.get("/v1/agentsched/info")).json()["engines"][0]
                    a.release.set()
                    await deferred
                    a.release.clear()
                    admitted = post("w-admitted")  # workflow 1: admitted, held at the engine
                    await asyncio.sleep(0.3)
                    second = post("w-deferred")  # workflow 0 again: waits behind the admitted call
                    await asyncio.sleep(0.3)
                    held = (await client.get("/v1/agentsched/info")).json()["engines"][0]
                    a.release.set()
                    return [await deferred, await admitted, await second], first, held

            responses, first, held = asyncio.run(run())
            metrics = httpx.get(gw.url + "/metrics").text
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert (first["inflight"], first["queued"]) == (1, 0)  # work-conserving: an idle engine takes it
    assert (held["inflight"], held["queued"]) == (1, 1)  # room for 4, but background work waits
    assert "agentsched_deferred_workflows_total 1.0" in metrics
