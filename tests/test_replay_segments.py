"""Replay prompts with the simulator's shared segments, token scaling of segments, and the reader
of the engines' prefix-cache counters (no live engines here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from benchmarks.sim_vs_real import median_ratio_interval
from deploy.calibrate import warm_prefill_check
from deploy.engines import prefix_caching_enabled
from deploy.replay import TOKEN_ID_RANGE, prompt_token_ids
from deploy.vllm_metrics import PrefixCacheCounters, parse_prefix_cache_counters
from envs.sim.cluster import ClusterSimulator
from envs.sim.config import ClusterConfig
from envs.sim.errors import UserError
from envs.sim.perf import PerfProfile, ProfileCoefficients, ProfileModel, solo_call_latency_s
from envs.sim.scenario import RunSpec, workload_for
from envs.sim.workload import (
    CallSpec,
    TraceGenerator,
    chess_static_prefix_tokens,
    load_trace,
    resolve_trace_path,
    scale_workflow,
)

DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parent.parent


def _calls(workflow):
    return [c for stage in workflow.stages for c in stage]


def _prompts(workflows, salt="s", seed=0):
    """Every call's replay prompt, per workflow, as the replayer builds them."""
    rng = random.Random(seed)
    return [[prompt_token_ids(c, f"wf{i}", "default", salt, rng) for c in _calls(wf)] for i, wf in enumerate(workflows)]


def _segment_slices(call: CallSpec):
    start = 0
    for seg in call.segments:
        yield seg, slice(start, start + seg.tokens)
        start += seg.tokens


@pytest.fixture(scope="module")
def scaled_trace1():
    return [scale_workflow(wf, 0.05) for wf in load_trace("chess_trace1")[:6]]


def test_shared_segments_get_the_same_ids_and_own_parts_fresh_ones(scaled_trace1) -> None:
    prompts = _prompts(scaled_trace1)
    by_segment: dict[tuple, list[int]] = {}
    own_parts: list[tuple[int, ...]] = []
    template_owners: dict[tuple, set[int]] = {}
    for wi, (wf, wf_prompts) in enumerate(zip(scaled_trace1, prompts)):
        for call, ids in zip(_calls(wf), wf_prompts):
            assert len(ids) == call.input_tokens
            assert all(TOKEN_ID_RANGE[0] <= t < TOKEN_ID_RANGE[1] for t in ids)
            used = 0
            for seg, where in _segment_slices(call):
                key = (seg.scope, seg.name, seg.tokens, wi if seg.scope == "workflow" else None)
                assert by_segment.setdefault(key, ids[where]) == ids[where], f"segment {key} differs between calls"
                if seg.scope == "template":
                    template_owners.setdefault(key, set()).add(wi)
                used = where.stop
            if call.input_tokens - used >= 8:
                own_parts.append(tuple(ids[used:]))
    # templates are shared across queries, and a workflow segment's name recurs in other queries
    # (evaluate#10) with other ids
    assert any(len(owners) == len(scaled_trace1) for owners in template_owners.values())
    shared_names = {}
    for (scope, name, tokens, _), ids in by_segment.items():
        if scope == "workflow":
            shared_names.setdefault((name, tokens), []).append(tuple(ids))
    recurring = [ids for ids in shared_names.values() if len(ids) > 1]
    assert recurring and all(len(set(ids)) == len(ids) for ids in recurring)
    # the calls' own rests are fresh random ids: no two alike
    assert len(own_parts) > 20 and len(set(own_parts)) == len(own_parts)


def test_router_chat_history_extends_the_previous_prompt(scaled_trace1) -> None:
    """A router call whose history extends the previous call of its agent sends that call's
    whole prompt first (so the engine's cache holds it), then its own turn."""
    prompts = _prompts(scaled_trace1)
    extended = 0
    for wf, wf_prompts in zip(scaled_trace1, prompts):
        last: dict[str, tuple[CallSpec, list[int]]] = {}
        for call, ids in zip(_calls(wf), wf_prompts):
            prev = last.get(call.step)
            if prev is not None and call.segments[:len(prev[0].segments)] == prev[0].segments \
                    and len(call.segments) > len(prev[0].segments):
                assert ids[:len(prev[1])] == prev[1]
                extended += 1
            if call.step in ("Information Retriever", "unit_tester"):
                last[call.step] = (call, ids)
    assert extended > 0


def test_salt_separates_replays_and_seed_only_changes_own_parts(scaled_trace1) -> None:
    wf = scaled_trace1[:1]
    a, b, c = _prompts(wf, salt="x", seed=0), _prompts(wf, salt="x", seed=1), _prompts(wf, salt="y", seed=0)
    call = _calls(wf[0])[5]  # a candidate: a large template, then its own rest
    template = sum(s.tokens for s in call.segments)
    assert template > 100
    assert a[0][5][:template] == b[0][5][:template]
    assert a[0][5][template:] != b[0][5][template:]
    assert a[0][5][:template] != c[0][5][:template]


@pytest.mark.parametrize("scale", [0.05, 0.01, 0.5])
def test_scaled_segments_stay_inside_the_scaled_prompt_and_one_size_per_segment(scale: float) -> None:
    full = load_trace("chess_trace1")
    for wf in full:
        scaled = scale_workflow(wf, scale)
        for c, f in zip(_calls(scaled), _calls(wf)):
            assert c.input_tokens == max(1, round(f.input_tokens * scale))
            assert c.output_tokens == max(1, round(f.output_tokens * scale))
            assert sum(s.tokens for s in c.segments) <= c.input_tokens
            assert all(s.tokens > 0 for s in c.segments)
            # the scaled segment ends are the full-size ends scaled (no template outgrows its prompt)
            end, ends = 0, set()
            for s in f.segments:
                end += s.tokens
                ends.add(min(c.input_tokens, round(end * scale)))
            end = 0
            for s in c.segments:
                end += s.tokens
                assert end in ends
    assert scale_workflow(full[0], 1.0) is full[0]


def test_marked_trace_is_the_scaled_trace_for_replay_and_simulator(tmp_path: Path) -> None:
    """sim_vs_real writes the trace with `token_scale` on each query: the simulator's workload of
    that file equals the replay's (the unscaled workload, scaled by the replayer)."""
    raw = json.loads(resolve_trace_path("chess_trace1").read_text())
    for q in raw:
        q["token_scale"] = 0.05
    marked = tmp_path / "t.json"
    marked.write_text(json.dumps(raw))
    sim_specs, sim_times = workload_for(RunSpec(trace=str(marked), queries=12, rate_qps=0.5, seed=3))
    real_specs, real_times = workload_for(RunSpec(trace="chess_trace1", queries=12, rate_qps=0.5, seed=3))
    assert [scale_workflow(w, 0.05).stages for w in real_specs] == [w.stages for w in sim_specs]
    assert np.array_equal(sim_times, real_times)
    raw[0]["token_scale"] = 0
    marked.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="token_scale"):
        load_trace(marked)


class _BlockHashCache:
    """vLLM's prefix cache by the letter, on token ids: full blocks keyed by their whole prefix,
    the longest cached run of blocks from the first token is a hit, capped at n - 1 tokens."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.blocks: set[tuple[int, ...]] = set()

    def admit(self, ids: list[int]) -> int:
        bs = self.bs
        hit = 0
        for b in range(len(ids) // bs):
            if tuple(ids[:(b + 1) * bs]) not in self.blocks:
                break
            hit = b + 1
        hit_tokens = min(hit, (len(ids) - 1) // bs) * bs
        for b in range(len(ids) // bs):
            self.blocks.add(tuple(ids[:(b + 1) * bs]))
        return hit_tokens


@pytest.mark.parametrize("block_size", [16, 128])
def test_replay_prompts_hit_a_real_block_cache_as_the_simulator_predicts(tmp_path: Path, block_size: int) -> None:
    """The replayer's token ids, run through a block-hash prefix cache (what vLLM does), give
    exactly the hit tokens the simulator's segment-level cache counts for the same scaled calls
    on one engine with room for everything, the queries one after another."""
    workflows = [scale_workflow(wf, 0.05) for wf in load_trace("chess_trace1")[:8]]
    profile = PerfProfile.load(REPO / "deploy" / "profiles" / "cpu-fast.yaml").model_copy(
        update={"block_size_tokens": block_size})
    profile.save(tmp_path / "p.yaml")
    cluster = ClusterConfig.model_validate({"name": "one", "engines": [
        {"name": "e", "gpu": "L4", "model": "Llama-3.1-8B", "profile": str(tmp_path / "p.yaml")}]})
    times = [1000.0 * i for i in range(len(workflows))]  # one query at a time
    sim = ClusterSimulator(cluster, workflows, times, slo_scale=3.0, step_tokens={"x": (10.0, 1.0)}, prefix_cache=True)
    order: list[int] = []  # call ids in the order the engine admits them
    while True:
        call = sim.next_decision()
        if call is None:
            break
        order.append(call.call_id)
        sim.dispatch(call, 0)
    cache = sim.engines[0].prefix_cache
    assert cache is not None and cache.evicted_blocks == 0
    prompts = [ids for wf_prompts in _prompts(workflows) for ids in wf_prompts]
    specs = [c for wf in workflows for c in _calls(wf)]
    reference = _BlockHashCache(block_size)
    assert cache.query_tokens == sum(len(p) for p in prompts)
    lucky = 0
    for i in order:
        real = reference.admit(prompts[i])
        simulated = sim.calls[i].cached_tokens
        if real != simulated:
            # the one way they may differ: the call's own random ids happen to continue a cached
            # block past its shared segments (ids from a range of ~1000: about one boundary in 1000)
            assert real == simulated + block_size and real > sum(s.tokens for s in specs[i].segments), i
            lucky += 1
    assert cache.hit_tokens > 0 and lucky <= 2


def test_counter_reader_parses_the_cpu_engines_metrics_page() -> None:
    text = (DATA / "vllm_cpu_metrics_prefix_cache.txt").read_text()
    assert parse_prefix_cache_counters(text) == PrefixCacheCounters(1024.0, 0.0)
    assert prefix_caching_enabled(text) is True
    assert prefix_caching_enabled(text.replace('enable_prefix_caching="True"', 'enable_prefix_caching="False"')) is False
    assert prefix_caching_enabled("vllm:num_requests_running 0\n") is None


OLD_GENERATION = """# HELP vllm:gpu_prefix_cache_queries_total GPU prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 900.0
vllm:gpu_prefix_cache_queries_total{engine="1",model_name="m"} 100.0
# HELP vllm:gpu_prefix_cache_hits_total GPU prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 640.0
vllm:gpu_prefix_cache_hits_total{engine="1",model_name="m"} 0.0
"""

NO_TOTAL_SUFFIX = """# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries{engine="0"} 300
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits{engine="0"} 128
"""


def test_counter_reader_reads_older_names_sums_cores_and_never_counts_twice() -> None:
    assert parse_prefix_cache_counters(OLD_GENERATION) == PrefixCacheCounters(1000.0, 640.0)
    assert parse_prefix_cache_counters(NO_TOTAL_SUFFIX) == PrefixCacheCounters(300.0, 128.0)
    # an engine exposing both generations: the current names only
    both = (DATA / "vllm_cpu_metrics_prefix_cache.txt").read_text() + OLD_GENERATION
    assert parse_prefix_cache_counters(both) == PrefixCacheCounters(1024.0, 0.0)
    assert parse_prefix_cache_counters("vllm:num_requests_running 0\n") is None
    delta = PrefixCacheCounters(1500.0, 900.0) - PrefixCacheCounters(1000.0, 640.0)
    assert delta == PrefixCacheCounters(500.0, 260.0) and delta.hit_rate == pytest.approx(0.52)


def test_generator_fitted_to_a_scaled_trace_scales_the_drawn_queries_segments() -> None:
    """Queries drawn beyond a scaled trace get templates of the scaled size, not the full-size
    template cut to the (scaled) prompt."""
    scaled = [scale_workflow(wf, 0.05) for wf in load_trace("chess_trace1")]
    generator = TraceGenerator.fit(scaled)
    assert generator.token_scale == 0.05
    drawn = generator.sample(20, np.random.default_rng(0))
    templates = {}
    for wf in drawn:
        assert wf.token_scale == 0.05
        for c in _calls(wf):
            assert 0 < sum(s.tokens for s in c.segments) <= c.input_tokens
            for s in c.segments:
                if s.scope == "template":
                    templates.setdefault(s.name, set()).add(s.tokens)
    full_size = chess_static_prefix_tokens()["generate_candidate_one"]
    # the candidate template is its full size scaled (rounded at its end), wherever the prompt has room
    assert max(templates["chess/generate_candidate_one"]) <= round(full_size * 0.05)
    candidates = [c for wf in drawn for c in _calls(wf) if c.step == "generate_candidate"]
    assert any(c.input_tokens - sum(s.tokens for s in c.segments) > 50 for c in candidates)


def test_warm_prefill_check_compares_probes_with_the_simulators_prefill_of_hits() -> None:
    """Probes timed exactly as the simulator's engine model prefills a prompt with hits give no
    error; warm calls 10% slower show as +10% and as less time saved than simulated."""
    coeffs = ProfileCoefficients(base_s=0.005, prefill_token_s=2e-5, decode_seq_s=1e-4, context_token_s=1e-7,
                                 attn_pair_s=3e-8)
    model, per_call_s = ProfileModel(PerfProfile(iteration=coeffs)), 0.004
    probes = [(256, 128), (512, 384), (1024, 896)]
    exact = [(n, h, per_call_s + solo_call_latency_s(model, n, 1, n),
              per_call_s + solo_call_latency_s(model, n, 1, n, cached_tokens=h)) for n, h in probes]
    fit = warm_prefill_check(exact, coeffs, per_call_s)
    assert fit["warm_prefill_median_abs_rel_err"] == pytest.approx(0.0, abs=1e-12)
    assert fit["warm_cold_ratio_median_rel_err"] == pytest.approx(0.0, abs=1e-12)
    assert fit["warm_prefill_saved_ratio"] == pytest.approx(1.0)
    # the hits save prefill compute: a warm prompt is faster than a cold one of its length
    assert all(warm < cold for _, _, cold, warm in exact)
    slower = [(n, h, cold, warm * 1.1) for n, h, cold, warm in exact]
    fit = warm_prefill_check(slower, coeffs, per_call_s)
    assert fit["warm_prefill_median_rel_err"] == pytest.approx(-0.1 / 1.1)
    assert fit["warm_prefill_saved_ratio"] < 1.0


def test_workflow_median_ratio_interval_is_paired_and_brackets_the_run() -> None:
    """sim_vs_real's interval of median(sim) / median(real) resamples matched workflows together:
    a simulator off by a constant factor gets exactly that factor, and a gap in the latencies
    at the median (what moves one run's median error by points) widens the interval."""
    rng = np.random.default_rng(1)
    real = rng.uniform(0.3, 0.6, 31)
    assert median_ratio_interval(real * 1.1, real) == pytest.approx((1.1, 1.1))
    noisy = real * rng.normal(1.0, 0.05, real.size)
    lo, hi = median_ratio_interval(noisy, real)
    assert lo < np.median(noisy) / np.median(real) < hi and hi - lo < 0.3
    gap = np.concatenate([np.full(15, 0.40), np.full(16, 0.46)])  # two modes, the median at the upper
    lo_gap, hi_gap = median_ratio_interval(gap, gap[::-1].copy())
    assert hi_gap - lo_gap > 0.1
