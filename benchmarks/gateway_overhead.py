"""Gateway overhead: added latency (p50, p99) vs a direct call at 200 req/s, highest routed rate,
the time of one hexgen dispatch decision, and the cost of the prefix index on 10k-token prompts.

The upstream here is a *minimal local HTTP server* (not vLLM) that answers every completion at
once with a fixed body: a real engine's own latency and jitter (tens of ms on CPU) would drown
the sub-millisecond figure being measured. It speaks HTTP/1.1 keep-alive like vLLM's uvicorn and
serves a vLLM-shaped /metrics page so the gateway's 100 ms scrape loop runs as in production.
Upstream, gateway and load generator (aiohttp, the same for direct and gateway calls) are three
processes on this 2-core machine.

    .venv/bin/python benchmarks/gateway_overhead.py [--policy hexgen] [--requests 3000]

Prefix hashing: the same run sends `--long-requests` 10k-token prompts (an 8k-token template shared
by all, then 2k tokens of each prompt's own) directly and through three fresh gateways, in
`--long-rounds` interleaved rounds whose order rotates (one condition after another would let
the machine's drift decide the comparison): prefix index off
(`gateway.prefix_index: false`: no hashing), on with segments of the engine's block size, and on
with `prefix_segment_tokens: 128` (each prompt hashed into its chain, looked up, acquired and
released in the engine's index), and prints the added p50/p99 of each; the in-process time of
hashing one such prompt is printed beside them. The stub engine has vLLM's GPU block size (16
tokens: 625 segments per prompt, the costly case; 128-token segments, the CPU build's block size,
are 8x fewer).

`--engine http://127.0.0.1:8101` instead compares tiny calls (16 prompt tokens, 1 output token) sent
directly to a live vLLM engine and through a gateway in front of it, in alternating blocks (so
both see the same background load): p50 / p99 / max and the count of calls over 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from agentsched.cli import ScriptArgumentParser, run_argparse_script  # noqa: E402

COMPLETION = json.dumps({"id": "cmpl-0", "object": "text_completion", "model": "tiny",
                         "choices": [{"index": 0, "text": " ok", "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 16, "completion_tokens": 1, "total_tokens": 17}}).encode()
METRICS = (b'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine="0",model_name="tiny"} 0.0\n'
           b'# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0\n'
           b'# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0\n')
GOALS = {"p99_added_ms": 2.0, "routed_rps": 1000.0, "decision_us": 100.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- minimal upstream (its own process)
class _Upstream(asyncio.Protocol):
    def connection_made(self, transport):  # type: ignore[override]
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < head_end + 4 + length:
                return
            path = head.split(" ", 2)[1]
            self.buf = self.buf[head_end + 4 + length:]
            body, ctype = (METRICS, b"text/plain") if path == "/metrics" else (
                (b"{}", b"application/json") if path == "/health" else (COMPLETION, b"application/json"))
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)


def run_upstream(port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_Upstream, "127.0.0.1", port, backlog=4096))
    loop.run_until_complete(server.serve_forever())


# ---------------------------------------------------------------- load generation
def client_session(url: str) -> aiohttp.ClientSession:
    """The load generator's client (aiohttp, keep-alive pool), the same for direct and gateway calls."""
    return aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0),
                                 skip_auto_headers=("User-Agent",), auto_decompress=False)


async def post(session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> int:
    async with session.post("/v1/completions", data=body,
                            headers={"Content-Type": "application/json", **headers}) as r:
        data = await r.read()
        assert r.status == 200, data[:200]
        return r.status


async def open_loop(url: str, rate_rps: float, n: int, headers: dict[str, str], body: bytes | None = None,
                    bodies: list[bytes] | None = None) -> np.ndarray:
    """Send n requests at a fixed rate (open loop), cycling through `bodies` if given; latency of each, seconds."""
    pool = client_session(url)
    body = body or json.dumps({"model": "tiny", "prompt": list(range(16)), "max_tokens": 1}).encode()
    lat = np.zeros(n)

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        await post(pool, bodies[i % len(bodies)] if bodies else body, headers)
        lat[i] = time.perf_counter() - t0

    start = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = start + i / rate_rps - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    await pool.close()
    return lat


async def closed_loop(url: str, concurrency: int, duration_s: float, headers: dict[str, str]) -> float:
    """Requests per second completed by `concurrency` back-to-back clients."""
    pool = client_session(url)
    body = json.dumps({"model": "tiny", "prompt": list(range(16)), "max_tokens": 1}).encode()
    done = 0
    end = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await post(pool, body, headers)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await pool.close()
    return done / (time.perf_counter() - t0)


def wait_http(url: str, path: str, timeout_s: float = 30) -> None:
    async def probe() -> bool:
        try:
            async with client_session(url) as session, session.get(path, timeout=aiohttp.ClientTimeout(total=1)) as r:
                return r.status == 200
        except Exception:  # noqa: BLE001
            return False

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if asyncio.run(probe()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url}{path} not up")


LONG_PROMPT_TOKENS = 10_000
LONG_TEMPLATE_TOKENS = 8_000


def long_bodies(n_distinct: int = 40, seed: int = 0) -> list[bytes]:
    """10k-token completion bodies: a shared 8k-token template, then 2k ids of each one's own."""
    rng = np.random.default_rng(seed)
    template = rng.integers(10, 32000, LONG_TEMPLATE_TOKENS).tolist()
    return [json.dumps({"model": "tiny", "prompt": template + rng.integers(10, 32000, LONG_PROMPT_TOKENS
                                                                           - LONG_TEMPLATE_TOKENS).tolist(),
                        "max_tokens": 1}).encode() for _ in range(n_distinct)]


def hashing_time_us(block_tokens: int, n: int = 400) -> dict[str, float]:
    """In-process time of the prefix index's work for one 10k-token call: hashing its chain
    (prefix_index.token_segments), one lookup, acquire when sent, release when done."""
    from deploy.gateway.prefix_index import EnginePrefixIndex, token_segments

    prompts = [json.loads(b)["prompt"] for b in long_bodies(8)]
    index = EnginePrefixIndex(block_tokens, 2**31 - 1)
    hashing = np.zeros(n)
    total = np.zeros(n)
    for i in range(n):
        t0 = time.perf_counter()
        segments = token_segments(prompts[i % len(prompts)], block_tokens)
        t1 = time.perf_counter()
        index.hit_tokens(segments, LONG_PROMPT_TOKENS)
        index.acquire(i, segments, LONG_PROMPT_TOKENS)
        index.release(i)
        hashing[i] = t1 - t0
        total[i] = time.perf_counter() - t0
    return {"hash_p50_us": float(np.percentile(hashing, 50) * 1e6), "hash_p99_us": float(np.percentile(hashing, 99) * 1e6),
            "call_p50_us": float(np.percentile(total, 50) * 1e6), "call_p99_us": float(np.percentile(total, 99) * 1e6)}


def decision_time_us(policy_name: str, n_engines: int = 8, n: int = 20000) -> dict[str, float]:
    """Time of policy.dispatch on the gateway's live state view (in process)."""
    from deploy.cluster import Cluster, ClusterFile
    from deploy.gateway.core import Gateway
    from policies import load_policy

    table = {"Information Retriever": 0.1, "extract_keywords": 0.5, "generate_candidate": 9.0, "revise": 1.4,
             "unit_tester": 0.08, "generate_unit_test": 1.2, "evaluate": 0.4}
    spec = ClusterFile.model_validate({"engines": [
        {"name": f"e{i}", "url": f"http://127.0.0.1:{20000 + i}", "gpu": "A100" if i % 2 else "H100", "latency_s": table}
        for i in range(n_engines)]})
    policy = load_policy(policy_name)
    gw = Gateway(Cluster(spec), policy)  # state only: never started, so no event loop or connection is used
    policy.reset()
    steps = list(table)
    calls = [gw.new_call(workflow_key=f"w{i % 50}", step=steps[i % len(steps)], tenant="t", input_tokens=500,
                              output_tokens=50, stream=False) for i in range(1000)]
    times = np.zeros(n)
    for i in range(n):
        call = calls[i % len(calls)]
        t0 = time.perf_counter()
        e = policy.dispatch(call, gw.state)
        times[i] = time.perf_counter() - t0
        eng = gw.state.engines[e]
        eng.ledger.place(0.01)
    return {"p50_us": float(np.percentile(times, 50) * 1e6), "p99_us": float(np.percentile(times, 99) * 1e6),
            "mean_us": float(times.mean() * 1e6), "n_engines": n_engines}


def live_engine(args: argparse.Namespace) -> None:
    """Direct vs via-gateway tiny calls against one live engine, alternating blocks."""
    gw_port = free_port()
    table = {s: 0.05 for s in ("Information Retriever", "extract_keywords", "generate_candidate", "revise",
                               "unit_tester", "generate_unit_test", "evaluate")}
    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    cluster = workdir / "cluster.yaml"
    cluster.write_text(json.dumps({"name": "bench", "engines": [
        {"name": "engine", "url": args.engine, "gpu": "cpu", "latency_s": table, "max_num_seqs": 32}]}))
    log_path = workdir / "gateway.log"
    with open(log_path, "wb") as log:
        gateway = subprocess.Popen([str(REPO / ".venv" / "bin" / "agentsched"), "serve", "--cluster", str(cluster),
                                    "--policy", args.policy, "--port", str(gw_port)], stdout=log, stderr=subprocess.STDOUT)
    gw_url = f"http://127.0.0.1:{gw_port}"
    hdr = {"X-Workflow-Id": "bench", "X-Workflow-Step": "revise", "X-Tenant": "bench"}
    body = json.dumps({"model": "tiny", "prompt": list(range(10, 26)), "max_tokens": 1, "ignore_eos": True}).encode()
    direct, via = [], []
    try:
        wait_http(gw_url, "/health")
        asyncio.run(open_loop(gw_url, args.rate, 100, hdr, body))  # warm-up
        block = max(1, args.requests // args.blocks)
        for _ in range(args.blocks):
            direct.append(asyncio.run(open_loop(args.engine, args.rate, block, {}, body)))
            via.append(asyncio.run(open_loop(gw_url, args.rate, block, hdr, body)))
    finally:
        gateway.terminate()
        gateway.wait(15)
    d, v = np.concatenate(direct) * 1e3, np.concatenate(via) * 1e3
    result = {"engine": args.engine, "rate_rps": args.rate, "requests_each": len(d), "loadavg": os.getloadavg()[0]}
    for name, a in (("direct", d), ("gateway", v)):
        result.update({f"{name}_p50_ms": float(np.percentile(a, 50)), f"{name}_p99_ms": float(np.percentile(a, 99)),
                       f"{name}_max_ms": float(a.max()), f"{name}_over_100ms": int((a > 100).sum())})
    result["added_p50_ms"] = result["gateway_p50_ms"] - result["direct_p50_ms"]
    result["added_p99_ms"] = result["gateway_p99_ms"] - result["direct_p99_ms"]
    print(f"tiny calls at {args.rate:.0f} req/s, {len(d)} direct and {len(v)} via the gateway ({args.blocks} alternating blocks), "
          f"load average {result['loadavg']:.1f}:")
    for name in ("direct", "gateway"):
        print(f"  {name:8s} p50 {result[name + '_p50_ms']:.2f} ms  p99 {result[name + '_p99_ms']:.2f} ms  "
              f"max {result[name + '_max_ms']:.1f} ms  over 100 ms: {result[name + '_over_100ms']}")
    print(f"  added    p50 {result['added_p50_ms']:.2f} ms  p99 {result['added_p99_ms']:.2f} ms   (gateway log: {log_path})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = ScriptArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="hexgen")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--engine", default=None, help="live vLLM engine URL: direct vs gateway comparison instead")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks with --engine")
    parser.add_argument("--long-requests", type=int, default=4000, help="10k-token prompts per prefix-hashing condition")
    parser.add_argument("--long-rounds", type=int, default=8, help="interleaved rounds the 10k-token prompts are sent in")
    args = parser.parse_args()
    if args.engine:
        live_engine(args)
        return

    up_port, gw_port = free_port(), free_port()
    upstream = mp.get_context("spawn").Process(target=run_upstream, args=(up_port,), daemon=True)
    upstream.start()
    up_url, gw_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    table = {s: 0.05 for s in ("Information Retriever", "extract_keywords", "generate_candidate", "revise",
                               "unit_tester", "generate_unit_test", "evaluate")}
    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    cluster = workdir / "cluster.yaml"
    engines = [{"name": "stub", "url": up_url, "gpu": "stub", "latency_s": table, "max_num_seqs": 1024}]
    cluster.write_text(json.dumps({"name": "bench", "engines": engines}))
    # the 10k-token conditions: a fresh gateway each (not the one that served the phases above, whose
    # heap and history would weigh on one condition only)
    conditions = {"off": {"prefix_index": False}, "on, block-size segments": {},
                  "on, 128-token segments": {"prefix_segment_tokens": 128}}
    ports: dict[str, int] = {}
    paths = [(cluster, gw_port)]
    for name, knobs in conditions.items():
        ports[name] = free_port()
        path = workdir / f"cluster-{ports[name]}.yaml"
        path.write_text(json.dumps({"name": "bench", "engines": engines, "gateway": knobs}))
        paths.append((path, ports[name]))
    gateways = [subprocess.Popen([str(REPO / ".venv" / "bin" / "agentsched"), "serve", "--cluster", str(path),
                                  "--policy", args.policy, "--port", str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for path, port in paths]
    bodies = long_bodies()
    try:
        wait_http(up_url, "/health")
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}", "/health")
        hdr = {"X-Workflow-Id": "bench", "X-Workflow-Step": "revise", "X-Tenant": "bench"}
        asyncio.run(open_loop(gw_url, args.rate, 400, hdr))  # warm-up
        direct = asyncio.run(open_loop(up_url, args.rate, args.requests, {}))
        via = asyncio.run(open_loop(gw_url, args.rate, args.requests, hdr))
        rps = asyncio.run(closed_loop(gw_url, args.concurrency, args.duration, hdr))
        direct_rps = asyncio.run(closed_loop(up_url, args.concurrency, min(args.duration, 3.0), {}))
        # 10k-token prompts: direct, gateway without hashing, gateway with hashing (same run, same bodies)
        for port in ports.values():  # warm-up
            asyncio.run(open_loop(f"http://127.0.0.1:{port}", args.rate, 200, hdr, bodies=bodies))
        # interleaved rounds, the order rotating, so drift of the machine's load weighs on every condition alike
        targets = {"direct": (up_url, {})} | {name: (f"http://127.0.0.1:{port}", hdr) for name, port in ports.items()}
        per_round = -(-args.long_requests // args.long_rounds)
        long_parts: dict[str, list[np.ndarray]] = {name: [] for name in targets}
        order = list(targets)
        for r in range(args.long_rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                url, headers = targets[name]
                long_parts[name].append(asyncio.run(open_loop(url, args.rate, per_round, headers, bodies=bodies)))
        long_direct = np.concatenate(long_parts.pop("direct"))
        long_via = {name: np.concatenate(parts) for name, parts in long_parts.items()}
    finally:
        for gateway in gateways:
            gateway.terminate()
            gateway.wait(10)
        upstream.terminate()
    decision = decision_time_us(args.policy)
    hashing = {block: hashing_time_us(block) for block in (16, 128)}
    pct = lambda a, q: float(np.percentile(a, q) * 1e3)  # noqa: E731 - ms
    result = {
        "rate_rps": args.rate, "requests": args.requests, "policy": args.policy, "cores": os.cpu_count(),
        "direct_p50_ms": pct(direct, 50), "direct_p99_ms": pct(direct, 99),
        "gateway_p50_ms": pct(via, 50), "gateway_p99_ms": pct(via, 99),
        "added_p50_ms": pct(via, 50) - pct(direct, 50), "added_p99_ms": pct(via, 99) - pct(direct, 99),
        "direct_max_ms": float(direct.max() * 1e3), "gateway_max_ms": float(via.max() * 1e3),
        "added_max_ms": float(via.max() * 1e3) - float(direct.max() * 1e3),
        "direct_over_50ms": int((direct > 0.05).sum()), "gateway_over_50ms": int((via > 0.05).sum()),
        "loadavg": os.getloadavg()[0],
        "routed_rps": rps, "direct_rps": direct_rps,
        "decision": decision,
        "long_prompt_tokens": LONG_PROMPT_TOKENS, "long_requests": args.long_requests,
        "long_direct_p99_ms": pct(long_direct, 99),
        "long_added_ms": {name: {"p50": pct(lat, 50) - pct(long_direct, 50), "p99": pct(lat, 99) - pct(long_direct, 99)}
                          for name, lat in long_via.items()},
        "hashing_us": {str(block): t for block, t in hashing.items()},
    }
    print(f"gateway overhead at {args.rate:.0f} req/s ({args.requests} requests, policy {args.policy}, minimal local upstream):")
    print(f"  direct   p50 {result['direct_p50_ms']:.3f} ms  p99 {result['direct_p99_ms']:.3f} ms")
    print(f"  gateway  p50 {result['gateway_p50_ms']:.3f} ms  p99 {result['gateway_p99_ms']:.3f} ms")
    print(f"  added    p50 {result['added_p50_ms']:.3f} ms  p99 {result['added_p99_ms']:.3f} ms"
          f"   (goal p99 <= {GOALS['p99_added_ms']} ms: ratio {result['added_p99_ms'] / GOALS['p99_added_ms']:.2f})")
    print(f"  max      direct {result['direct_max_ms']:.1f} ms  gateway {result['gateway_max_ms']:.1f} ms;"
          f"  calls over 50 ms: direct {result['direct_over_50ms']}, gateway {result['gateway_over_50ms']}"
          f"  (load average {result['loadavg']:.1f})")
    print(f"  routed   {rps:.0f} req/s with {args.concurrency} clients (direct {direct_rps:.0f} req/s)"
          f"   (goal >= {GOALS['routed_rps']:.0f}: ratio {rps / GOALS['routed_rps']:.2f})")
    print(f"  {args.policy} decision p50 {decision['p50_us']:.1f} us  p99 {decision['p99_us']:.1f} us on {decision['n_engines']} engines"
          f"   (goal <= {GOALS['decision_us']:.0f} us: ratio {decision['p99_us'] / GOALS['decision_us']:.2f})")
    print(f"  10k-token prompts at {args.rate:.0f} req/s ({args.long_requests} each; 8k shared template, block 16):"
          f" direct p99 {result['long_direct_p99_ms']:.3f} ms")
    for name, added in result["long_added_ms"].items():
        print(f"    added, prefix index {name + ':':25s} p50 {added['p50']:.3f} ms  p99 {added['p99']:.3f} ms"
              f"   (goal p99 <= {GOALS['p99_added_ms']} ms: ratio {added['p99'] / GOALS['p99_added_ms']:.2f})")
    for block, t in hashing.items():
        print(f"    in process, {block}-token segments: hashing a 10k-token prompt p50 {t['hash_p50_us']:.0f} us"
              f" (p99 {t['hash_p99_us']:.0f}); hash + lookup + acquire + release p50 {t['call_p50_us']:.0f} us"
              f" (p99 {t['call_p99_us']:.0f})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_argparse_script(main)
