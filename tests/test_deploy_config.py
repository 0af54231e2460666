"""Deploy pieces that need no engine: cluster files, CLI user errors, metric parsing, HTTP client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cluster import load_cluster, parse_size_bytes
from deploy.gateway.core import parse_vllm_metrics
from deploy.upstream import Upstream, UpstreamError

REPO = Path(__file__).resolve().parent.parent

VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 7.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 3.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.93
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="tiny"} 12.0
vllm:num_preemptions_created{engine="0",model_name="tiny"} 1.7e+09
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",engine="0",kv_cache_size_tokens="10752"} 1.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="tiny"} 5.0
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentsched.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_shipped_local_cluster_is_valid() -> None:
    cluster = load_cluster(REPO / "deploy" / "clusters" / "local-cpu.yaml")
    fast, slow = cluster.engines
    assert fast.base_url == "http://127.0.0.1:8101" and slow.base_url == "http://127.0.0.1:8102"
    assert fast.launch.cpu_bind != slow.launch.cpu_bind
    assert fast.launch.kv_cache_bytes == 64 << 20
    assert cluster.gateway.scrape_interval_s <= 0.1


@pytest.mark.parametrize("text,expected", [("64M", 64 << 20), ("4MiB", 4 << 20), ("1G", 1 << 30), (1024, 1024)])
def test_size_parsing(text, expected) -> None:
    assert parse_size_bytes(text) == expected


@pytest.mark.parametrize("yaml_text,needle", [
    ("engines: []\n", "engines"),
    ("engines:\n  - {name: a}\n", "url"),
    ("engines:\n  - {name: a, url: 'ftp://x'}\n", "http://"),
    ("engines:\n  - {name: a, url: 'http://h:1', colour: red}\n", "colour"),
    ("engines:\n  - {name: a, url: 'http://h:1'}\n  - {name: a, url: 'http://h:2'}\n", "unique"),
    ("engines:\n  - name: a\n    launch: {model_dir: m, port: 1, cpu_bind: '0', kv_cache_memory: lots}\n", "kv_cache_memory"),
    ("engines:\n  - name: a\n    launch: {model_dir: m, port: 1, cpu_bind: 'first'}\n", "cpu_bind"),
    ("engines: [unclosed\n", "not valid YAML"),
])
def test_bad_cluster_file_is_one_line_exit_2(tmp_path, yaml_text, needle) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    result = run_cli("serve", "--cluster", str(path), "--policy", "rr")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_cluster_and_bad_flags_exit_2(tmp_path) -> None:
    r = run_cli("engines", "up", "--cluster", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("replay", "--gateway", "localhost:8000", "--trace", "chess_trace1", "--rate", "1", "--slo-scale", "3")
    assert r.returncode == 2 and "--gateway" in r.stderr
    r = run_cli("calibrate", "--engine", "127.0.0.1:8101")
    assert r.returncode == 2 and "--engine" in r.stderr
    r = run_cli("serve", "--cluster", str(REPO / "deploy" / "clusters" / "local-cpu.yaml"), "--policy", "no-such-policy")
    assert r.returncode == 2 and "no-such-policy" in r.stderr and "Traceback" not in r.stderr


def test_parse_vllm_metrics_keeps_engine_state() -> None:
    values = parse_vllm_metrics(VLLM_METRICS)
    assert values["vllm:num_requests_running"] == 7
    assert values["vllm:num_requests_waiting"] == 3  # the by_reason breakdown is not double counted
    assert values["vllm:kv_cache_usage_perc"] == pytest.approx(0.93)
    assert values["vllm:num_preemptions_total"] == 12
    assert values["kv_cache_size_tokens"] == 10752


def test_upstream_reports_unreachable_upstream() -> None:
    async def go() -> None:
        pool = Upstream("http://127.0.0.1:9", connect_timeout_s=0.5)
        with pytest.raises(UpstreamError):
            await pool.fetch("GET", "/health")
        await pool.close()

    asyncio.run(go())


def test_upstream_chunked_and_keepalive() -> None:
    """Against a real (stdlib) HTTP/1.1 server: content-length and chunked bodies, connection reuse."""

    async def go() -> None:
        peers: list[tuple] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername"))
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path == b"/chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Upstream(f"http://127.0.0.1:{port}")
        r1 = await pool.fetch("POST", "/x", b"{}")
        r2 = await pool.fetch("GET", "/chunked")
        r3 = await pool.fetch("GET", "/x")
        assert (r1.status, r1.body) == (201, b"ok")
        assert (r2.status, r2.body) == (200, b"hello world")
        assert r3.body == b"ok"
        assert len(peers) == 1  # one keep-alive connection served all three
        await pool.close()
        server.close()

    asyncio.run(go())


def test_gateway_expected_latency_adds_what_the_simulator_adds(tmp_path) -> None:
    """The gateway's T_e(s) from a profile pays the same per-call times as the simulator's Engine:
    request overhead, engine time and API-server time per call (PerfProfile.solo_overhead_s)."""
    import yaml

    from deploy.gateway.state import build_engine_model
    from envs.sim.model import StepTokens
    from envs.sim.perf import PerfProfile

    raw = yaml.safe_load((REPO / "deploy" / "clusters" / "local-cpu.yaml").read_text())
    base = PerfProfile.load(REPO / "deploy" / "profiles" / "cpu-fast.yaml")
    tables = []
    for name, (overhead, engine, frontend) in {"zero": (0.0, 0.0, 0.0), "costly": (0.004, 0.001, 0.002)}.items():
        p = base.model_copy(deep=True)
        p.request_overhead_s, p.call_engine_s, p.call_frontend_s = overhead, engine, frontend
        p.save(tmp_path / f"{name}.yaml")
        raw["engines"][0]["profile"] = str(tmp_path / f"{name}.yaml")
        raw["workdir"] = str(tmp_path / "work")
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(raw))
        cluster = load_cluster(tmp_path / "cluster.yaml")
        model = build_engine_model(cluster.engines[0], cluster, StepTokens.from_reference(cluster.gateway.token_scale))
        tables.append(model.latency_by_step(model.step_tokens.steps()))
    zero, costly = tables
    assert zero.keys() == costly.keys() and len(zero) >= 5
    assert all(costly[s] - zero[s] == pytest.approx(0.007) for s in zero)


def test_gateway_calls_carry_their_workflow_deadline(tmp_path) -> None:
    """Every call of a workflow carries the workflow's end-to-end deadline (what workflow-first
    orders by), as in the simulator; no engine is contacted."""
    import yaml

    from deploy.gateway.core import Gateway
    from policies import load_policy

    raw = yaml.safe_load((REPO / "deploy" / "clusters" / "local-cpu.yaml").read_text())
    raw["workdir"] = str(tmp_path / "work")
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(raw))

    async def calls():
        gw = Gateway(load_cluster(tmp_path / "cluster.yaml"), load_policy("least-work+workflow"))
        first = gw.new_call(workflow_key="q1", step="keyword_extraction", tenant="t", input_tokens=10,
                            output_tokens=5, stream=False, slo_s=40.0)
        later = gw.new_call(workflow_key="q1", step="revise", tenant="t", input_tokens=10, output_tokens=5,
                            stream=False, slo_s=40.0)
        other = gw.new_call(workflow_key="q2", step="revise", tenant="t", input_tokens=10, output_tokens=5,
                            stream=False, slo_s=10.0)
        return gw, first, later, other

    gw, first, later, other = asyncio.run(calls())
    wf = gw.state.workflow(first.workflow_id)
    assert first.workflow_deadline_s == later.workflow_deadline_s == wf.deadline_s == pytest.approx(wf.arrival_time_s + 40.0)
    assert other.workflow_deadline_s == pytest.approx(gw.state.workflow(other.workflow_id).arrival_time_s + 10.0)
    assert later.deadline_s < later.workflow_deadline_s  # a call's own slice ends before its workflow's
