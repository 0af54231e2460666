"""Cache-aware dispatchers: published routers that send a call where its prompt prefix is cached.

Each reads the prefix cache only through the view (`EngineView.cached_prefix_tokens(call)`: the
prompt tokens an engine would serve from its cache now; `prefix_cache_tokens`: how much it holds).
That is the engines' true cache state, as llm-d's precise prefix-cache scorer and Dynamo's KV
router get from the engines' KV events; SGLang's router and llm-d's approximate scorer instead keep
their own estimate from the requests they routed, which misses evictions. Without a prefix cache
(or without prompt segments) every match is 0 and each falls back to its load rule.

Ties go to the lowest engine index unless a router's definition picks at random (seeded here).
"""

from __future__ import annotations

import math
import random

from envs.sim.view import CallView, ClusterView, EngineView
from heuristics.base import Dispatcher, NoHealthyEngine, check_choice, check_int, check_non_negative, check_unit_interval
from heuristics.dispatch import WeightedScoring


def _match_share(cached_tokens: int, call: CallView) -> float:
    return cached_tokens / call.input_tokens if call.input_tokens > 0 else 0.0


class PrefixScoring(WeightedScoring):
    """llm-d's default scheduling profile: prefix-cache scorer (weight 3), queue scorer (2) and
    KV-cache-utilisation scorer (2), max-score picker (random among ties).

        score(e) = w_prefix x matched share + w_queue x (max_q - q_e) / (max_q - min_q) + w_kv x (1 - kv_e)

    The prefix-cache scorer's score is the share of the prompt's blocks cached on the engine
    (matched blocks / prompt blocks, here cached tokens / prompt tokens); queue and KV scorers as in
    `WeightedScoring`. Source: llm-d inference scheduler, default EndpointPickerConfig (plugins
    prefix-cache-scorer, queue-scorer, kv-cache-utilization-scorer, max-score-picker;
    https://llm-d.ai/docs/architecture/core/router/epp/scheduling).
    """

    name = "prefix-scoring"
    knobs = ("prefix_weight", "queue_weight", "kv_weight", "seed")
    search_space = {"prefix_weight": ("float", 0.0, 6.0), "queue_weight": ("float", 0.0, 4.0),
                    "kv_weight": ("float", 0.0, 4.0)}

    def __init__(self, prefix_weight: float = 3.0, queue_weight: float = 2.0, kv_weight: float = 2.0,
                 seed: int = 0) -> None:
        super().__init__(queue_weight=queue_weight, kv_weight=kv_weight, seed=seed)
        self.prefix_weight = check_non_negative("prefix_weight", prefix_weight)

    def extra_score(self, call: CallView, engine: EngineView) -> float:
        """llm-d's prefix-cache scorer: the share of the prompt this engine holds, times its weight."""
        return self.prefix_weight * _match_share(engine.cached_prefix_tokens(call), call)


class SGLangCacheAware(Dispatcher):
    """SGLang router's `cache_aware` policy.

    Load = requests the router has on a worker (here running + waiting calls). The system is
    imbalanced when max - min load > `balance_abs_threshold` and max > `balance_rel_threshold` x
    min: then the least-loaded worker gets the call. Otherwise the worker with the longest prefix
    match gets it if that match is more than `cache_threshold` of the prompt; if not, the worker
    with the smallest cache (most room to build one; `fallback="least-load"`: the least-loaded
    worker instead). Source: sgl-project/sglang, sgl-router `policies/cache_aware.rs` (rule) and
    router arguments (cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold 1.5).
    """

    name = "sglang-cache-aware"
    knobs = ("cache_threshold", "balance_abs_threshold", "balance_rel_threshold", "fallback")
    search_space = {"cache_threshold": ("float", 0.0, 1.0), "balance_abs_threshold": ("float", 0.0, 128.0),
                    "balance_rel_threshold": ("float", 1.0, 4.0)}

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: float = 64.0,
                 balance_rel_threshold: float = 1.5, fallback: str = "smallest-cache") -> None:
        self.cache_threshold = check_unit_interval("cache_threshold", cache_threshold)
        self.balance_abs_threshold = check_non_negative("balance_abs_threshold", balance_abs_threshold)
        self.balance_rel_threshold = check_non_negative("balance_rel_threshold", balance_rel_threshold)
        self.fallback = check_choice("fallback", fallback, ("smallest-cache", "least-load"))

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        healthy = [(i, e) for i, e in enumerate(cluster.engines) if e.healthy]
        if not healthy:
            raise NoHealthyEngine("no healthy engine")
        loads = [e.num_running + e.num_waiting for _, e in healthy]
        lo, hi = min(loads), max(loads)
        least_loaded = healthy[loads.index(lo)][0]
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            return least_loaded
        best, best_match = -1, -1
        for i, e in healthy:
            match = e.cached_prefix_tokens(call)
            if match > best_match:
                best, best_match = i, match
        if _match_share(best_match, call) > self.cache_threshold:
            return best
        if self.fallback == "least-load":
            return least_loaded
        return min(zip(healthy, loads), key=lambda p: (p[0][1].prefix_cache_tokens, p[1], p[0][0]))[0][0]


class DynamoKV(Dispatcher):
    """NVIDIA Dynamo's KV router (its default cost function):

        logit(e) = overlap_weight x overlap_e - kv_usage_e - waiting_e / max waiting

    overlap = cached prompt blocks x block size / prompt tokens (here cached tokens / prompt
    tokens), KV use in [0, 1], waiting normalised by the largest waiting queue. Temperature 0 (the
    default) takes the highest logit; above 0 the engine is drawn from softmax(logit / T) (seeded).
    Source: Dynamo docs, "KV Router Performance Tuning" (default cost function `2 * score -
    gpu_cache_usage - normalized_waiting`) and the KV router's `--router-temperature` (default 0).
    """

    name = "dynamo-kv"
    knobs = ("overlap_weight", "temperature", "seed")
    search_space = {"overlap_weight": ("float", 0.0, 6.0), "temperature": ("float", 0.0, 2.0)}

    def __init__(self, overlap_weight: float = 2.0, temperature: float = 0.0, seed: int = 0) -> None:
        self.overlap_weight = check_non_negative("overlap_weight", overlap_weight)
        self.temperature = check_non_negative("temperature", temperature, "0 = always the best engine")
        self.seed = check_int("seed", seed)
        self._rng = random.Random(self.seed)

    def reset(self) -> None:
        self._rng = random.Random(self.seed)

    def logits(self, call: CallView, cluster: ClusterView) -> dict[int, float]:
        healthy = [(i, e) for i, e in enumerate(cluster.engines) if e.healthy]
        max_waiting = max((e.num_waiting for _, e in healthy), default=0)
        inv = 1.0 / max_waiting if max_waiting else 0.0
        return {i: self.overlap_weight * _match_share(e.cached_prefix_tokens(call), call) - e.kv_usage
                - e.num_waiting * inv for i, e in healthy}

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        logits = self.logits(call, cluster)
        if not logits:
            raise NoHealthyEngine("no healthy engine")
        if self.temperature <= 0.0:
            return max(logits, key=lambda i: (logits[i], -i))
        top = max(logits.values())
        weights = [math.exp((v - top) / self.temperature) for v in logits.values()]
        return self._rng.choices(list(logits), weights=weights)[0]


class PrebleE2(Dispatcher):
    """Preble's E2 (exploit / explore) global scheduler (Srivatsa et al., arXiv 2407.00023).

    If some engine holds more of the prompt than `exploit_ratio` (Preble: the cached prefix is
    longer than the part still to compute, 0.5), exploit: the engine with the longest cached prefix
    (ties: the least loaded). Otherwise explore: the engine with the smallest load cost, its
    outstanding work (Preble: the prefill and decode time of its recent requests) plus this call's
    expected time there given its hits (Preble: its prefill time there). Preble's eviction-cost
    term, its post-assignment rebalancing and its prefill/decode autoscaling are not modelled.
    """

    name = "preble"
    knobs = ("exploit_ratio",)
    search_space = {"exploit_ratio": ("float", 0.0, 1.0)}

    def __init__(self, exploit_ratio: float = 0.5) -> None:
        self.exploit_ratio = check_unit_interval("exploit_ratio", exploit_ratio)

    def dispatch(self, call: CallView, cluster: ClusterView) -> int:
        best, best_key = -1, None
        matches: list[tuple[int, int]] = []
        for i, e in enumerate(cluster.engines):
            if e.healthy:
                matches.append((i, e.cached_prefix_tokens(call)))
        if not matches:
            raise NoHealthyEngine("no healthy engine")
        engines = cluster.engines
        top = max(m for _, m in matches)
        if top > 0 and _match_share(top, call) > self.exploit_ratio:
            for i, m in matches:
                if m == top:
                    key = engines[i].outstanding_work_s
                    if best_key is None or key < best_key:
                        best, best_key = i, key
            return best
        for i, _ in matches:
            e = engines[i]
            cost = e.outstanding_work_s + e.expected_call_latency_s(call)
            if best_key is None or cost < best_key:
                best, best_key = i, cost
        return best
