"""vLLM's prefix-cache counters, read from an engine's /metrics page: one reader for the gateway's
scrapes, `agentsched replay` and `agentsched calibrate`.

vLLM counts prompt tokens looked up in the prefix cache (`queries`) and served from it (`hits`)
when it admits a request. The V1 engine names them `vllm:prefix_cache_{queries,hits}`; earlier
releases `vllm:gpu_prefix_cache_{queries,hits}`; prometheus_client exposes counters with a
`_total` suffix (and a `_created` sample, skipped here). A server with several engine cores has
one label set per core: they are summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from prometheus_client.parser import text_string_to_metric_families

# current names first: where an engine exposes both generations they count the same tokens, so
# only the first present is read (summing them would count every token twice)
PREFIX_CACHE_COUNTER_NAMES = {
    "queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    "hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
}
PREFIX_CACHE_SAMPLE_PREFIXES = ("vllm:prefix_cache_", "vllm:gpu_prefix_cache_")


@dataclass(frozen=True)
class PrefixCacheCounters:
    """An engine's prefix-cache counters at one moment, in tokens; `after - before` is the count
    between two readings of one engine (no restart between)."""

    queries_tokens: float
    hits_tokens: float

    def __sub__(self, before: PrefixCacheCounters) -> PrefixCacheCounters:
        return PrefixCacheCounters(self.queries_tokens - before.queries_tokens, self.hits_tokens - before.hits_tokens)

    @property
    def hit_rate(self) -> float:
        """hits / queries: the quantity the simulator's `prefix_cache_hit_rate` is (NaN without queries)."""
        return self.hits_tokens / self.queries_tokens if self.queries_tokens > 0 else float("nan")


def counters_from_samples(samples: Mapping[str, float]) -> PrefixCacheCounters | None:
    """The counters from prefix-cache sample values already summed over engine cores, keyed by
    sample name (with or without `_total`); None when either counter is missing."""
    values = {}
    for kind, names in PREFIX_CACHE_COUNTER_NAMES.items():
        value = next((samples[n + suffix] for n in names for suffix in ("_total", "") if n + suffix in samples), None)
        if value is None:
            return None
        values[kind] = value
    return PrefixCacheCounters(values["queries"], values["hits"])


def add_prefix_cache_sample(samples: dict[str, float], name: str, value: float) -> None:
    """Sum one parsed sample into `samples` (engine cores add up; `_created` timestamps are skipped)."""
    if not name.endswith("_created"):
        samples[name] = samples.get(name, 0.0) + value


def parse_prefix_cache_counters(metrics_text: str) -> PrefixCacheCounters | None:
    """The prefix-cache counters of a vLLM /metrics page; None when it has neither generation of
    names (prefix caching off on an older engine, or not vLLM). The page is mostly histograms, so
    lines are filtered by prefix before prometheus_client's parser sees them."""
    kept = "\n".join(line for line in metrics_text.splitlines()
                     if line.startswith("#") or line.startswith(PREFIX_CACHE_SAMPLE_PREFIXES)) + "\n"
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(kept):
        for sample in family.samples:
            if sample.name.startswith(PREFIX_CACHE_SAMPLE_PREFIXES):
                add_prefix_cache_sample(samples, sample.name, sample.value)
    return counters_from_samples(samples)
