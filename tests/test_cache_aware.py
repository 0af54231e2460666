"""Cache-aware routers decide as their published rules say, on hand-built states; least-work and
HexGen count only the prefill an engine must compute; the registry names them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from envs.sim.view import EngineView
from heuristics import registry
from heuristics.cache_aware import DynamoKV, PrebleE2, PrefixScoring, SGLangCacheAware
from heuristics.dispatch import LeastWork, WorkloadBalanced
from policies import PolicyError, load_policy
from tests.test_heuristics import FakeCall, FakeEngine, cluster


@dataclass
class CacheEngine(FakeEngine):
    cached: int = 0  # prompt tokens of the call this engine holds
    prefix_cache_tokens: int = 0
    warm_latency_s: float | None = None  # the call's latency given the hits

    def cached_prefix_tokens(self, call) -> int:
        return self.cached

    def expected_call_latency_s(self, call) -> float:
        return self.warm_latency_s if self.cached and self.warm_latency_s is not None else self.latency_s[call.step]


def _e(cached: int = 0, waiting: int = 0, running: int = 0, kv: float = 0.0, lat: float = 10.0, warm: float | None = None,
       work: float = 0.0, tree: int = 0) -> CacheEngine:
    return CacheEngine({"gen": lat}, num_waiting=waiting, num_running=running, kv_usage=kv, cached=cached,
                       warm_latency_s=warm, outstanding_work_s=work, prefix_cache_tokens=tree)


CALL = FakeCall(input_tokens=1000)


def test_fake_engine_satisfies_the_view() -> None:
    assert isinstance(_e(), EngineView)


def test_llmd_prefix_scorer_weighs_the_cached_share() -> None:
    # prefix 3 x 0.6 = 1.8 beats a queue advantage of 2 x (1 - 0) ... only if the queues are close
    c = cluster(_e(cached=600, waiting=1), _e(cached=0, waiting=0))
    # engine 0: 3 x 0.6 + 2 x 0 + 2 = 3.8; engine 1: 0 + 2 x 1 + 2 = 4.0
    assert PrefixScoring().dispatch(CALL, c) == 1
    c = cluster(_e(cached=800, waiting=1), _e(cached=0, waiting=0))  # 3 x 0.8 + 2 = 4.4 > 4.0
    assert PrefixScoring().dispatch(CALL, c) == 0
    assert PrefixScoring(prefix_weight=0.0).dispatch(CALL, c) == 1  # = llm-d without the prefix scorer


def test_sglang_cache_aware_rule() -> None:
    # balanced: the best match wins when it is above 30% of the prompt
    c = cluster(_e(cached=0, waiting=2), _e(cached=400, waiting=5), _e(cached=200))
    assert SGLangCacheAware().dispatch(CALL, c) == 1
    # below the threshold: the smallest cache (most room), or the least loaded with fallback=least-load
    c = cluster(_e(cached=250, waiting=1, tree=9000), _e(cached=0, waiting=3, tree=100), _e(waiting=2, tree=5000))
    assert SGLangCacheAware().dispatch(CALL, c) == 1
    assert SGLangCacheAware(fallback="least-load").dispatch(CALL, c) == 0
    # imbalanced (max - min > 64 and max > 1.5 x min): the least loaded, whatever the cache holds
    c = cluster(_e(cached=900, waiting=100), _e(cached=0, waiting=10))
    assert SGLangCacheAware().dispatch(CALL, c) == 1
    # a big absolute gap that is not relatively big is balanced
    c = cluster(_e(cached=900, waiting=180), _e(cached=0, waiting=130))
    assert SGLangCacheAware().dispatch(CALL, c) == 0


def test_dynamo_cost_function() -> None:
    # logits: 2 x 0.5 - 0.5 - 1.0 = -0.5 vs 2 x 0 - 0.1 - 0 = -0.1
    c = cluster(_e(cached=500, kv=0.5, waiting=4), _e(cached=0, kv=0.1, waiting=0))
    d = DynamoKV()
    assert d.logits(CALL, c) == pytest.approx({0: -0.5, 1: -0.1})
    assert d.dispatch(CALL, c) == 1
    c = cluster(_e(cached=900, kv=0.5, waiting=1), _e(cached=0, kv=0.1, waiting=1))  # 1.8-0.5-1 = 0.3 > -1.1
    assert d.dispatch(CALL, c) == 0
    # with a temperature the choice is a seeded softmax draw over the same logits
    hot = DynamoKV(temperature=1.0, seed=3)
    picks = [hot.dispatch(CALL, c) for _ in range(400)]
    hot.reset()
    assert picks == [hot.dispatch(CALL, c) for _ in range(400)]
    share = picks.count(0) / len(picks)
    assert share == pytest.approx(1 / (1 + pow(2.718281828, -1.4)), abs=0.07)


def test_preble_exploits_long_matches_and_explores_otherwise() -> None:
    # 60% cached on engine 2: exploit it even though it is busier
    c = cluster(_e(work=1.0), _e(cached=100, work=0.0), _e(cached=600, work=50.0))
    assert PrebleE2().dispatch(CALL, c) == 2
    # 40%: explore, the smallest outstanding work + expected latency given hits
    c = cluster(_e(work=30.0), _e(cached=400, warm=5.0, work=26.0), _e(work=40.0))
    assert PrebleE2().dispatch(CALL, c) == 1  # 26 + 5 < 30 + 10
    assert PrebleE2(exploit_ratio=0.3).dispatch(CALL, cluster(_e(work=1.0), _e(cached=400, work=99.0))) == 1


def test_least_work_and_hexgen_count_only_the_prefill_left() -> None:
    # same speed and backlog; engine 1 holds the prompt, so the call is shorter there
    c = cluster(_e(lat=10.0), _e(cached=800, lat=10.0, warm=4.0))
    assert LeastWork().dispatch(CALL, c) == 1
    assert WorkloadBalanced(alpha=0.5).dispatch(CALL, c) == 1
    # without hits both break the tie at the lowest index, as before
    c = cluster(_e(lat=10.0), _e(lat=10.0))
    assert LeastWork().dispatch(CALL, c) == 0 and WorkloadBalanced(alpha=0.5).dispatch(CALL, c) == 0


@pytest.mark.parametrize("name", ["llmd-prefix", "sglang-cache-aware", "dynamo-kv", "preble"])
def test_named_and_listed(name: str) -> None:
    assert name in registry.NAMED and registry.NAMED[name].dispatch in registry.DISPATCHERS
    policy = load_policy(name)
    assert policy.spec()


@pytest.mark.parametrize("name,knobs", [("sglang-cache-aware", {"cache_threshold": 1.5}),
                                        ("sglang-cache-aware", {"fallback": "nearest"}),
                                        ("dynamo-kv", {"temperature": -1.0}), ("preble", {"exploit_ratio": 2.0}),
                                        ("llmd-prefix", {"prefix_weight": -3})])
def test_bad_knobs_are_one_clear_error(name: str, knobs: dict) -> None:
    from policies import policy_from_spec

    with pytest.raises(PolicyError, match=next(iter(knobs))):
        policy_from_spec({"kind": "heuristic", "base": name, "dispatch": knobs})
