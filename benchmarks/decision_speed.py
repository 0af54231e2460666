"""Time per dispatch decision (and per queue key) of every heuristic on a 64-engine cluster state.

The state is a real simulator cluster of 64 engines (four GPU types, Llama-3.1-70B) whose engines
carry random but plausible load (queues, KV use, outstanding and cumulative work) and a prefix
cache that holds some of the calls' prompt prefixes (each call's prompt is a step template, a
per-query segment and its own rest), so `expected_latency_s`, `cached_prefix_tokens`,
`expected_call_latency_s` and every view field cost what they cost in a run. Target: <= 100 us per
hexgen decision. Run: .venv/bin/python benchmarks/decision_speed.py [--engines 64] [--decisions 20000]
"""

from __future__ import annotations

import random
import time

from agentsched.cli import ScriptArgumentParser, run_argparse_script
from envs.sim.config import ClusterConfig, EngineConfig
from envs.sim.engine import LLMCall
from envs.sim.scenario import RunSpec, build_simulator
from heuristics import registry
from policies import load_policy

TARGET_US = {"hexgen": 100.0, "hexgen-outstanding": 100.0}
GPUS = ("H100", "A100-80G", "L40S", "A6000")  # Llama-3.1-70B, 4-bit weights on each


def make_state(n_engines: int, seed: int = 0):
    """A simulator (the ClusterView) with `n_engines` loaded engines, and ready calls of every step."""
    per_type = n_engines // len(GPUS)
    engines = [EngineConfig(gpu=g, model="Llama-3.1-70B", weight_bits=4, count=per_type + (1 if i < n_engines % len(GPUS) else 0))
               for i, g in enumerate(GPUS)]
    cluster = ClusterConfig(name=f"bench-{n_engines}", engines=engines)
    sim = build_simulator(RunSpec(cluster=cluster, rate_qps=1.0, queries=32))
    sim.run(load_policy("rr"))  # 32 workflows arrived (policies that read a call's workflow find it)
    rng = random.Random(seed)
    steps = sim.step_tokens.steps()
    for e in sim.engines:
        e.ledger.assigned_work_s = rng.uniform(0, 5000)
        e.ledger.outstanding_work_s = rng.uniform(0, 200)
        e.ledger.assigned_calls = rng.randrange(0, 1000)
        e.free_blocks = rng.randrange(0, e.total_blocks + 1)
        for k in range(rng.randrange(0, 6)):  # a few waiting calls
            e.waiting.append((0.0, k, None))
        for step in steps:
            e.expected_latency_s(step)  # warm the per-step cache, as after the first calls of a run
    if n_engines > 1:
        sim.engines[1].healthy = False  # one engine down: skipped by every dispatcher
    calls = []
    for i in range(256):
        step = steps[i % len(steps)]
        # prompt chain: the step's template (key = step index), a per-query segment, the call's own rest
        segments = ((steps.index(step), 600), (10_000 + i % 32, 300), (100_000 + i, 100))
        c = LLMCall(i, i % 32, "default", step, 0, 1, 1000, 50, 0, segments)
        c.ready_time_s = rng.uniform(0, 100)
        c.deadline_s = c.ready_time_s + rng.uniform(5, 100)
        calls.append(c)
    for e in sim.engines:  # each engine's cache holds the chains of a random half of the calls
        cache = e.prefix_cache
        if cache is not None:
            for c in rng.sample(calls, len(calls) // 2):
                cache.release(cache.acquire(c.segments))
    return sim, calls


def time_policy(name: str, sim, calls, decisions: int, repeats: int = 5) -> tuple[float, float]:
    """Best of `repeats` rounds (like timeit): other processes on a shared machine only add time."""
    policy = load_policy(name)
    n = len(calls)
    dispatch, key = policy.dispatch, policy.queue_key
    engine = sim.engines[0]
    for c in calls[:64]:
        dispatch(c, sim)  # warm-up
    per_round = max(1, decisions // repeats)
    dispatch_us = key_us = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(per_round):
            dispatch(calls[i % n], sim)
        dispatch_us = min(dispatch_us, (time.perf_counter() - start) / per_round * 1e6)
        start = time.perf_counter()
        for i in range(per_round):
            key(calls[i % n], engine)
        key_us = min(key_us, (time.perf_counter() - start) / per_round * 1e6)
    return dispatch_us, key_us


def main() -> None:
    parser = ScriptArgumentParser(description=__doc__)
    parser.add_argument("--engines", type=int, default=64)
    parser.add_argument("--decisions", type=int, default=20000)
    args = parser.parse_args()
    sim, calls = make_state(args.engines)
    print(f"{args.engines}-engine cluster state, {args.decisions} decisions per policy (best of 5 rounds)")
    print(f"{'policy':20s} {'dispatch us':>12s} {'queue key us':>13s}  target")
    failed = False
    for name in registry.NAMED:
        d_us, k_us = time_policy(name, sim, calls, args.decisions)
        target = TARGET_US.get(name)
        verdict = ""
        if target is not None:
            ok = d_us <= target
            failed |= not ok
            verdict = f"<= {target:.0f} us {'ok' if ok else 'MISSED'}"
        print(f"{name:20s} {d_us:12.1f} {k_us:13.2f}  {verdict}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    run_argparse_script(main)
