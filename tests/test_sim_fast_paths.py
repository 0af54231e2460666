"""The simulator's fast paths answer exactly what the plain rules answer: `PrefixCache.admit` is
`admission` + `acquire` + `evict_down_to`, `DecodeSegmentCost.iterations_within` is the bisection
over `total_s`, and engines configured alike share latency memos without changing any value."""

from __future__ import annotations

import copy
import gc
import random
import threading

from envs.sim.config import EngineConfig
from envs.sim.gc_pause import cyclic_gc_paused
from envs.sim.model import StepTokens, build_engine_model
from envs.sim.perf import DecodeSegmentCost
from envs.sim.prefix_cache import PrefixCache


def _state(cache: PrefixCache) -> tuple:
    nodes = sorted((k, n.blocks, n.cached, n.refs) for k, n in cache.nodes.items())
    return (nodes, list(cache._lru), cache.evictable_blocks, cache.cached_blocks, cache.evicted_blocks)


def _random_chain(rng: random.Random, block_size: int) -> tuple[tuple[int, int], ...]:
    """A chain over a small tree of keys, so that chains share prefixes often."""
    chain = []
    parent = 0
    for _ in range(rng.randint(1, 4)):
        parent = parent * 3 + rng.randint(1, 3)
        chain.append((parent, rng.choice([1, block_size - 1, block_size, 2 * block_size + 3, rng.randint(1, 90)])))
    return tuple(chain)


def test_admit_is_admission_then_acquire_then_eviction() -> None:
    rng = random.Random(7)
    block_size = 16
    checked_fit = checked_full = 0
    for _ in range(120):
        cache = PrefixCache(block_size)
        free = 60
        held: list[list] = []
        for _ in range(40):
            chain = _random_chain(rng, block_size)
            prompt = sum(t for _, t in chain) + rng.choice([0, 0, 5])
            extra = rng.randint(0, 3)
            reference = copy.deepcopy(cache)
            hit, take = reference.admission(chain, prompt)
            need = take + extra
            got_hit, got_need, nodes = cache.admit(chain, prompt, free, extra)
            assert (got_hit, got_need) == (hit, need)
            if need > free:
                assert nodes is None
                checked_full += 1
            else:
                acquired = reference.acquire(chain)
                reference.evict_down_to(free - need)
                assert nodes is not None and [n.key for n in nodes] == [n.key for n in acquired]
                free -= need
                held.append(nodes)
                checked_fit += 1
            assert _state(cache) == _state(reference)
            assert cache.hit_tokens_for(chain, prompt) == reference.hit_tokens_for(chain, prompt)
            if held and rng.random() < 0.5:  # a call finishes: its blocks go back to the pool
                free += cache.release(held.pop(rng.randrange(len(held))))
                cache.evict_down_to(free)
            assert cache.evictable_blocks <= free
    assert checked_fit > 50 and checked_full > 50  # both outcomes exercised


def _bisect(cost: DecodeSegmentCost, elapsed_s: float, k_max: int) -> int:
    lo, hi = 0, k_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost.total_s(mid) <= elapsed_s + 1e-12:
            lo = mid
        else:
            hi = mid - 1
    return lo


def test_iterations_within_equals_bisection() -> None:
    rng = random.Random(3)
    for _ in range(20000):
        pieces = tuple((rng.choice([0.0, rng.uniform(0, 0.05)]), rng.choice([0.0, rng.uniform(0, 1e-4), rng.uniform(0, 1e-7)]))
                       for _ in range(rng.choice([1, 2])))
        cost = DecodeSegmentCost(rng.choice([0.0, rng.uniform(0, 0.01)]), pieces)
        k_max = rng.choice([0, 1, 2, 3, rng.randint(1, 64), rng.randint(1, 4000)])
        total = cost.total_s(k_max)
        elapsed = rng.choice([rng.uniform(-0.01, 1.2 * total + 0.01), cost.total_s(rng.randint(0, k_max)), total])
        assert cost.iterations_within(elapsed, k_max) == _bisect(cost, elapsed, k_max)


def test_twin_engines_share_latency_memos_with_the_same_values() -> None:
    tokens = StepTokens({"generate_candidate": (9000.0, 400.0), "evaluate": (3000.0, 20.0)})
    config = EngineConfig(gpu="A100-80G", model="Llama-3.1-70B", weight_bits=4)
    alone = build_engine_model(config.model_copy(update={"name": "alone"}), tokens)
    first = build_engine_model(config.model_copy(update={"name": "a"}), tokens)
    twin = build_engine_model(config.model_copy(update={"name": "b"}), tokens)
    twin.share_memos(first)
    for step, prompt, hit in (("generate_candidate", 11000, 9104), ("evaluate", 2500, 2400), ("evaluate", 2500, 0)):
        assert first.expected_latency_with_hits_s(step, prompt, hit) == alone.expected_latency_with_hits_s(step, prompt, hit)
        assert twin.expected_latency_with_hits_s(step, prompt, hit) == alone.expected_latency_with_hits_s(step, prompt, hit)
    assert twin.expected_latency_s("evaluate") == alone.expected_latency_s("evaluate")


def test_the_cyclic_collector_is_paused_only_from_the_main_thread() -> None:
    """gc is process-wide: a worker thread (the gateway's twin planner) must not switch it off for
    the event loop's thread."""
    assert gc.isenabled()
    with cyclic_gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    seen: list[bool] = []

    def worker() -> None:
        with cyclic_gc_paused():
            seen.append(gc.isenabled())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [True] and gc.isenabled()
