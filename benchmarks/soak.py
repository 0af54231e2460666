"""Soak test (not in CI): minutes of replay through a real gateway while engines are killed and
restarted, on live vLLM CPU engines.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--rate 0.5] [--kill-every-s 120]

Starts the cluster's engines (`engines up`, unless they already run) and `agentsched serve` as a
subprocess, replays CHESS workflows (non-streamed and streamed calls alternate by workflow: two
replays side by side) at `--rate` queries per second, and every `--kill-every-s` SIGKILLs one
engine's whole process group (fast and slow in turn) and starts it again (`engines up` path:
start, wait for /health, one warm-up round). Prints:

- calls lost: calls of the trace's workflows that never got a complete answer (goal 0);
- duplicates: complete answers the gateway gave beyond one per call (goal 0);
- added latency: a call's latency at the client minus the time the gateway waited on the engine
  for the answer that was served (`X-Agentsched-Upstream-S`, non-streamed calls): the gateway's
  own time, its queueing and the attempts lost to faults (p50 / p99);
- the gateway's resident memory at the start, the end and its peak (growth).

`--rate` should be near the cluster's capacity: 0.5 q/s is about what the two local CPU engines
sustain at token scale 0.05 with both up (measure yours with `agentsched replay` at rising rates).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentsched.cli import ScriptArgumentParser, run_argparse_script  # noqa: E402
from deploy.cluster import load_cluster  # noqa: E402
from deploy.engines import (  # noqa: E402
    engines_down,
    engines_up,
    running_pid,
    start_engine,
    stop_pid,
    wait_healthy,
    warm_up,
)
from deploy.replay import ReplayConfig, Replayer  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def answered_total(gateway_url: str) -> float:
    text = httpx.get(gateway_url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("agentsched_answered_calls_total{"))


def main() -> None:
    parser = ScriptArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default=str(REPO / "deploy" / "clusters" / "local-cpu.yaml"))
    parser.add_argument("--policy", default="hexgen")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.5, help="workflow arrivals per second (both replays together)")
    parser.add_argument("--kill-every-s", type=float, default=120.0)
    parser.add_argument("--token-scale", type=float, default=0.05)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cluster = load_cluster(args.cluster)
    local = [e for e in cluster.engines if e.launch is not None]
    started_engines = [e.name for e in local if running_pid(cluster, e) is None]
    engines_up(cluster)
    gw_url = f"http://127.0.0.1:{args.port}"
    gateway = subprocess.Popen([str(REPO / ".venv" / "bin" / "agentsched"), "serve", "--cluster", args.cluster,
                                "--policy", args.policy, "--port", str(args.port)],
                               stdout=subprocess.DEVNULL, stderr=open("/tmp/soak-gateway.log", "wb"))
    stop = threading.Event()
    kills: list[tuple[float, str, float, int]] = []  # (time, engine, s until it served again, calls in flight)
    memory: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(gw_url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and gateway.poll() is None, "gateway did not start"
            time.sleep(0.2)
        memory.append(rss_mb(gateway.pid))
        t0 = time.monotonic()

        def killer() -> None:
            turn = 0
            while not stop.wait(args.kill_every_s - (time.monotonic() - t0) % args.kill_every_s):
                spec = local[turn % len(local)]
                turn += 1
                pid = running_pid(cluster, spec)
                if pid is None:
                    continue
                # kill while the gateway has calls in flight on it (up to 10 s of waiting)
                inflight, wait_until = 0, time.monotonic() + 10
                while time.monotonic() < wait_until:
                    engines = httpx.get(gw_url + "/v1/agentsched/info", timeout=5).json()["engines"]
                    inflight = next(e["inflight"] for e in engines if e["name"] == spec.name)
                    if inflight:
                        break
                    time.sleep(0.01)
                at = time.monotonic() - t0
                stop_pid(pid, grace_s=5.0, sig=signal.SIGKILL)
                proc = start_engine(cluster, spec)
                wait_healthy([proc])
                warm_up([spec], rounds=1)
                kills.append((at, spec.name, time.monotonic() - t0 - at, inflight))
                print(f"  t={at:6.0f} s killed {spec.name} with {inflight} calls in flight; serving again after "
                      f"{kills[-1][2]:.0f} s", flush=True)

        def sampler() -> None:
            while not stop.wait(5.0):
                memory.append(rss_mb(gateway.pid))

        threads = [threading.Thread(target=killer, daemon=True), threading.Thread(target=sampler, daemon=True)]
        for t in threads:
            t.start()
        queries = max(1, int(round(args.rate / 2 * args.minutes * 60)))
        replayers = [Replayer(ReplayConfig(gateway=gw_url, trace="chess_trace1", rate_qps=args.rate / 2, slo_scale=3.0,
                                           token_scale=args.token_scale, queries=queries, seed=seed, stream=stream))
                     for seed, stream in ((11, False), (12, True))]
        results: list[dict] = [{} for _ in replayers]

        def run(i: int) -> None:
            import asyncio

            results[i].update(asyncio.run(replayers[i].run()))

        runners = [threading.Thread(target=run, args=(i,)) for i in range(len(replayers))]
        for t in runners:
            t.start()
        for t in runners:
            t.join()
        stop.set()
        wall = time.monotonic() - t0
        memory.append(rss_mb(gateway.pid))
        answered = answered_total(gw_url)
    finally:
        stop.set()
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
        if started_engines:
            engines_down(cluster, started_engines)

    calls = [c for r in replayers for c in r.calls]
    expected_calls = sum(w.n_calls for r in replayers for w in r.workflows)  # every call of every workflow
    complete = [c for c in calls if not math.isnan(c.finish_s)]
    added = np.array([(c.finish_s - c.ready_s) - r.upstream_s[c.call_id]
                      for r in replayers for c in r.calls if c.call_id in r.upstream_s])
    report = {
        "minutes": wall / 60, "rate_qps": args.rate, "policy": args.policy, "kills": kills,
        "workflows": sum(r["n_workflows"] for r in results), "workflows_finished": sum(r["n_finished"] for r in results),
        "calls": expected_calls, "calls_lost": expected_calls - len(complete),
        "duplicates": int(answered - len(complete)),
        "stream_error_events": sum(r.stream_error_events for r in replayers),
        "streams_truncated_silently": sum(r.streams_truncated for r in replayers),
        "client_tries_max": max((c.attempts for c in calls), default=0),
        "added_p50_ms": float(np.percentile(added, 50) * 1e3) if len(added) else math.nan,
        "added_p99_ms": float(np.percentile(added, 99) * 1e3) if len(added) else math.nan,
        "call_latency_p99_s": float(np.percentile([c.finish_s - c.ready_s for c in complete], 99)) if complete else math.nan,
        "gateway_rss_start_mb": memory[0], "gateway_rss_end_mb": memory[-1], "gateway_rss_peak_mb": max(memory),
        "loadavg": os.getloadavg()[0],
    }
    print(f"soak: {report['minutes']:.1f} min at {args.rate} q/s ({args.policy}), {len(kills)} engine kills")
    print(f"  workflows {report['workflows_finished']}/{report['workflows']} finished; calls lost {report['calls_lost']} "
          f"of {expected_calls}; duplicates {report['duplicates']}")
    print(f"  streams: {report['stream_error_events']} ended with an error event (retried), "
          f"{report['streams_truncated_silently']} truncated silently")
    print(f"  added latency (non-streamed calls): p50 {report['added_p50_ms']:.1f} ms  p99 {report['added_p99_ms']:.1f} ms;"
          f"  call latency p99 {report['call_latency_p99_s']:.2f} s")
    print(f"  gateway RSS {report['gateway_rss_start_mb']:.0f} MB -> {report['gateway_rss_end_mb']:.0f} MB "
          f"(peak {report['gateway_rss_peak_mb']:.0f} MB)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    run_argparse_script(main)
