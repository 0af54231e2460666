"""vLLM V1 prefix caching in the engine model: hit accounting on hand-computed cases, eviction
order, running calls' blocks, chat chains, the CHESS prompt structure, and cache off = today."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from envs.sim.config import ClusterConfig, EngineConfig
from envs.sim.engine import Engine, LLMCall
from envs.sim.metrics import chrome_trace
from envs.sim.model import StepTokens
from envs.sim.prefix_cache import PrefixCache
from envs.sim.scenario import RunSpec, build_simulator, simulate
from envs.sim.workload import CallSpec, WorkflowSpec, WorkflowTemplate, load_trace, warm_cache_hit_tokens, with_chess_segments
from policies import load_policy
from tests.sim_checks import check_finished_run, instrument_kv

BS = 16


def _engine(blocks: int | None = None, block_size: int = BS, prefix_cache: bool = True,
            step_tokens: dict[str, tuple[float, float]] | None = None) -> Engine:
    cfg = EngineConfig(gpu="A100-80G", model="Llama-3.1-70B", weight_bits=4, block_size_tokens=block_size)
    engine = Engine.from_config(0, cfg, StepTokens(step_tokens or {}), prefix_cache=prefix_cache)
    if blocks is not None:  # a small pool, to force evictions
        engine.total_blocks = engine.free_blocks = blocks
        engine.kv_capacity_tokens = blocks * block_size
    return engine


_ids = iter(range(10**6))


def _call(segments: list[tuple[int, int]], output_tokens: int = 1) -> LLMCall:
    n_in = sum(t for _, t in segments)
    return LLMCall(next(_ids), 0, "t", "step", 0, 1, n_in, output_tokens, 0, tuple(segments))


def _admit(engine: Engine, *calls: LLMCall, now_s: float = 0.0) -> float:
    for c in calls:
        engine.enqueue(c, now_s)
    return engine.plan(now_s, lambda c: None)


def _run_to_end(engine: Engine, now_s: float = 0.0) -> float:
    """Step the engine until it is idle; returns the time."""
    end = engine.plan(now_s, lambda c: None) if math.isnan(engine.busy_until_s) else engine.busy_until_s
    while end is not None:
        engine.complete(end)
        now_s = end
        end = engine.plan(now_s, lambda c: None)
    return now_s


def test_two_calls_sharing_a_template_one_after_the_other() -> None:
    engine = _engine()
    cache = engine.prefix_cache
    a = _call([(1, 100), (2, 50)])  # template 100 tokens (6 full blocks), own 50
    b = _call([(1, 100), (3, 70)])
    _admit(engine, a)
    assert a.cached_tokens == 0 and a.kv_tokens == 0
    assert engine.total_blocks - engine.free_blocks == 10  # ceil(150 / 16)
    t = _run_to_end(engine)
    # A's full blocks stay cached: template 6 + own 9 - 6 = 3
    assert cache.evictable_blocks == 9 and engine.free_blocks == engine.total_blocks
    assert engine.cached_prefix_tokens(b) == 96  # the template's 6 full blocks
    _admit(engine, b, now_s=t)
    assert b.cached_tokens == 96 and b.kv_tokens == 96 and b.prefill_left == 170 - 96
    _run_to_end(engine, t)
    assert cache.hit_tokens == 96 and cache.query_tokens == 150 + 170
    assert engine.prompt_tokens_admitted == 320
    assert engine.prefill_tokens_computed == 320 - 96


def test_calls_admitted_together_share_blocks_once() -> None:
    """vLLM V1 registers a prompt's blocks when it is scheduled: a call admitted in the same step
    already hits them, and the shared blocks are allocated once."""
    engine = _engine()
    a = _call([(1, 100), (2, 50)])
    b = _call([(1, 100), (3, 70)])
    _admit(engine, a, b)
    assert a.cached_tokens == 0 and b.cached_tokens == 96
    # A: 10 blocks; B: its own 170 // 16 - 6 = 4 full blocks + 1 partial; the template once
    assert engine.total_blocks - engine.free_blocks == 10 + 5
    assert engine.kv_usage == pytest.approx(15 / engine.total_blocks)


def test_last_prompt_token_is_always_computed() -> None:
    engine = _engine()
    a = _call([(1, 160)])  # exactly 10 blocks
    _admit(engine, a)
    t = _run_to_end(engine)
    again = _call([(1, 160)])
    assert engine.cached_prefix_tokens(again) == 144  # 9 blocks: the last block is recomputed
    _admit(engine, again, now_s=t)
    assert again.prefill_left == 16


def test_eviction_is_least_recently_released_first_tail_first() -> None:
    engine = _engine(blocks=30)
    cache = engine.prefix_cache

    def probe(key: int) -> int:  # cached tokens of a 176-token prompt starting with template `key`
        return engine.cached_prefix_tokens(_call([(key, 160), (99, 16)]))

    t = 0.0
    for key in (10, 20, 30):  # A, B, C: three 10-block prompts one after the other fill the pool with cache
        _admit(engine, _call([(key, 160)]), now_s=t)
        t = _run_to_end(engine, t)
    assert cache.evictable_blocks == 30 and engine.free_blocks == 30 and cache.evicted_blocks == 0
    _admit(engine, _call([(40, 160), (41, 16)]), now_s=t)  # D needs 11 blocks: all of A and B's tail block
    assert cache.evicted_blocks == 11
    assert (probe(10), probe(20), probe(30)) == (0, 9 * BS, 10 * BS)
    t = _run_to_end(engine, t)
    # a hit takes C's blocks out of the queue; the one block C's new call needs comes from B's tail
    c_again = _call([(30, 160), (32, 5)])
    _admit(engine, c_again, now_s=t)
    assert c_again.cached_tokens == 160 and cache.evicted_blocks == 12
    t = _run_to_end(engine, t)
    # queue now: B (8 blocks), D (tail node first, then its template), C: E's 11 blocks take B, D's tail
    # node and one block of D's template, and leave C alone
    _admit(engine, _call([(50, 160), (51, 16)]), now_s=t)
    assert (probe(20), probe(40), probe(30)) == (0, 9 * BS, 10 * BS)
    assert cache.evicted_blocks == 12 + 10


def test_running_calls_blocks_are_never_evicted() -> None:
    engine = _engine(blocks=30)
    cache = engine.prefix_cache
    old = _call([(1, 160), (2, 1)])
    _admit(engine, old)
    t = _run_to_end(engine)  # 10 cached blocks, evictable
    running = _call([(3, 160), (4, 1)], output_tokens=200)  # 11 blocks, decodes for a long time
    _admit(engine, running, now_s=t)
    second = _call([(5, 160), (6, 1)], output_tokens=200)
    engine.complete(engine.busy_until_s)
    _admit(engine, second, now_s=engine.busy_until_s if not math.isnan(engine.busy_until_s) else t)
    # 19 free blocks held 9 empty + 10 cached: admitting 11 evicts 2 of the old chain only
    node = cache.nodes[3]
    assert node.refs == 1 and node.cached == node.blocks == 10
    assert cache.evicted_blocks == 2
    third = _call([(7, 160), (8, 1)])
    engine.enqueue(third, 0.0)
    engine.complete(engine.busy_until_s)
    engine.plan(engine._seg_start_s, lambda c: None)
    assert math.isnan(third.admit_time_s), "no room without evicting a running call's blocks"
    assert cache.nodes[3].cached == 10 and cache.nodes[5].cached == 10
    _run_to_end(engine, engine._seg_start_s)
    assert not math.isnan(third.admit_time_s) and third.finish_time_s > 0


def test_preempted_call_keeps_its_prompt_cached() -> None:
    engine = _engine()
    a = _call([(1, 100), (2, 50)], output_tokens=50)
    _admit(engine, a)
    engine.complete(engine.busy_until_s)
    engine._preempt(a)
    assert a.cache_nodes is None and a.blocks == 0 and engine.free_blocks == engine.total_blocks
    assert engine.cached_prefix_tokens(a) == 144  # its own 9 full blocks are cached
    end = engine.plan(engine._seg_start_s, lambda c: None)
    assert a.cached_tokens == 144 and a.prefill_left == 150 + a.generated - 144 and end is not None


def test_failure_drops_the_cache() -> None:
    engine = _engine()
    a = _call([(1, 100), (2, 50)], output_tokens=50)
    _admit(engine, a)
    engine.drain()
    assert engine.prefix_cache.nodes == {} and engine.prefix_cache_tokens == 0
    assert engine.free_blocks == engine.total_blocks and a.cache_nodes is None and a.shared_blocks == 0


def test_block_size_follows_the_engine() -> None:
    engine = _engine(block_size=128)
    a = _call([(1, 300), (2, 50)])
    _admit(engine, a)
    _run_to_end(engine)
    assert engine.prefix_cache.block_size == 128
    assert engine.cached_prefix_tokens(_call([(1, 300), (3, 9)])) == 256


def test_expected_call_latency_counts_only_the_prefill_left() -> None:
    engine = _engine(step_tokens={"step": (9000.0, 100.0)})
    big = _call([(1, 8000), (2, 1000)])
    assert engine.expected_call_latency_s(big) == engine.expected_latency_s("step")  # nothing cached
    _admit(engine, big)
    _run_to_end(engine)
    other = _call([(1, 8000), (3, 1000)])
    assert engine.cached_prefix_tokens(other) == 8000
    assert engine.expected_call_latency_s(other) < 0.8 * engine.expected_latency_s("step")


def _sim_single_workflow(tmp_path: Path, calls: list[dict]) -> tuple:
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([{"Text2SQLRequest": calls}]))
    cluster = ClusterConfig(name="one", engines=[EngineConfig(gpu="A100-80G", model="Llama-3.1-70B", weight_bits=4)])
    spec = RunSpec(trace=str(trace), cluster=cluster, rate_qps=1.0, seed=0)
    policy = load_policy("rr")
    sim = build_simulator(spec, queue_key=policy.queue_key)
    problems = instrument_kv(sim)
    sim.run(policy)
    assert not problems, problems[:3]
    check_finished_run(sim)
    return sim


def test_chat_chain_extends_itself(tmp_path: Path) -> None:
    """The router calls of one query (301, 304, 308, 312 tokens) each hit the previous prompt's full
    blocks: 0, 18 x 16, 19 x 16, 19 x 16 (the last token of 304 is recomputed)."""
    steps = [{"step": "Information Retriever", "input_length": n, "output_length": 4} for n in (301, 304, 308, 312)]
    sim = _sim_single_workflow(tmp_path, steps)
    assert [c.cached_tokens for c in sim.calls] == [0, 288, 304, 304]


def test_evaluate_fanout_shares_its_schema(tmp_path: Path) -> None:
    """Evaluate calls of one stage share all but their last ~30 tokens; admitted together, the later
    ones hit the first one's blocks (template 210 + shared 958 - 240 = 718 -> 928 tokens, 58 blocks)."""
    steps = [{"step": "evaluate", "input_length": n, "output_length": 22} for n in (958, 958, 959, 968)]
    sim = _sim_single_workflow(tmp_path, steps)
    assert [c.cached_tokens for c in sim.calls] == [0, 928, 928, 928]


def test_chess_segments_follow_the_templates() -> None:
    wf = load_trace("chess_trace1")[0]
    by_step = {}
    for stage in wf.stages:
        for c in stage:
            assert sum(s.tokens for s in c.segments) <= c.input_tokens
            by_step.setdefault(c.step, []).append(c)
    one, two = sorted(by_step["generate_candidate"], key=lambda c: -c.input_tokens)
    assert [s.name for s in one.segments] == ["chess/generate_candidate", "chess/generate_candidate_one"]
    assert sum(s.tokens for s in one.segments) == 9110 and sum(s.tokens for s in two.segments) == 5250
    assert [s.tokens for s in by_step["revise"][0].segments] == [2860]
    evaluate = by_step["evaluate"]
    shared = [s for s in evaluate[0].segments if s.scope == "workflow"]
    assert shared and all(c.segments == evaluate[0].segments for c in evaluate)
    assert min(c.input_tokens for c in evaluate) - sum(s.tokens for s in evaluate[0].segments) == 30
    ir = by_step["Information Retriever"]
    assert [sum(s.tokens for s in c.segments) for c in ir] == [c.input_tokens for c in ir]
    assert all(ir[k].segments[: len(ir[k - 1].segments)] == ir[k - 1].segments for k in range(1, len(ir)))
    # about 60% of a query's prompt tokens are a warm-cache prefix (issue's estimate)
    share = warm_cache_hit_tokens(wf) / sum(c.input_tokens for s in wf.stages for c in s)
    assert 0.4 < share < 0.8
    # a step that is not a CHESS step gets no segments
    plain = with_chess_segments(WorkflowSpec(((CallSpec("other", 100, 10),),)))
    assert plain.stages[0][0].segments == ()


def test_yaml_template_segments(tmp_path: Path) -> None:
    import numpy as np

    template = WorkflowTemplate.model_validate({"name": "agent", "stages": [
        {"step": "plan", "input_tokens": {"median": 1500}, "output_tokens": {"median": 10},
         "prompt": [{"scope": "template", "name": "system", "tokens": 800},
                    {"scope": "tenant", "name": "tools", "tokens": 400}]},
        {"step": "act", "input_tokens": {"median": 300}, "output_tokens": {"median": 10},
         "prompt": [{"scope": "template", "name": "system", "tokens": 800}]}]})
    wf = template.sample(1, np.random.default_rng(0))[0]
    plan, act = wf.stages[0][0], wf.stages[1][0]
    assert [(s.scope, s.name, s.tokens) for s in plan.segments] == [("template", "agent/system", 800),
                                                                     ("tenant", "tools", 400)]
    assert [s.tokens for s in act.segments] == [300]  # a prompt shorter than its prefix cuts it short
    with pytest.raises(ValueError, match="one size"):
        WorkflowTemplate.model_validate({"stages": [
            {"step": "a", "input_tokens": {"median": 10}, "output_tokens": {"median": 1},
             "prompt": [{"scope": "workflow", "name": "h", "tokens": 5}]},
            {"step": "b", "input_tokens": {"median": 10}, "output_tokens": {"median": 1},
             "prompt": [{"scope": "workflow", "name": "h", "tokens": 6}]}]})


def _stripped(spec: RunSpec, policy_name: str, prefix_cache: bool) -> dict:
    """A run whose calls carry no prompt segments (the simulator before prompt structure existed)."""
    policy = load_policy(policy_name)
    policy.reset()
    sim = build_simulator(spec.model_copy(update={"prefix_cache": prefix_cache}), queue_key=policy.queue_key)
    sim._specs = [WorkflowSpec(tuple(tuple(CallSpec(c.step, c.input_tokens, c.output_tokens) for c in stage)
                                     for stage in wf.stages), wf.source) for wf in sim._specs]
    sim.run(policy)
    return _metrics(sim)


def _metrics(sim) -> dict:
    from envs.sim.metrics import records_from_simulator, summarize

    out = summarize(*records_from_simulator(sim))
    out.pop("sim_wall_s")
    return out


@pytest.mark.parametrize("policy", ["rr", "hexgen", "least-work+workflow", "llmd"])
@pytest.mark.parametrize("seed", [0, 3])
def test_cache_off_reproduces_the_cacheless_simulator(policy: str, seed: int) -> None:
    """Cache off ignores prompt structure entirely: every metric equals a run without segments,
    with the cache on or off (a cache without segments never hits). And the check can fail: the
    same run with the cache on and segments differs."""
    spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.08, seed=seed, queries=40, prefix_cache=False)
    off, sim = simulate(spec, load_policy(policy))
    off.pop("sim_wall_s")
    for key in ("policy", "rate_qps", "slo_scale", "seed", "trace", "cluster", "base_slo_s", "decisions", "prefix_cache"):
        off.pop(key)
    assert off == _stripped(spec, policy, prefix_cache=False)
    assert off == _stripped(spec, policy, prefix_cache=True)
    assert off["prefix_cache_hit_rate"] == 0.0 and off["prefill_tokens"] > 0
    on, _ = simulate(spec.model_copy(update={"prefix_cache": True}), load_policy(policy))
    assert on["prefix_cache_hit_rate"] > 0.3
    assert on["prefill_tokens"] < off["prefill_tokens"]
    assert on["latency_p50_s"] != off["latency_p50_s"]


def test_metrics_and_chrome_trace_report_the_cache() -> None:
    spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.02, seed=0, queries=20)
    result, sim = simulate(spec, load_policy("hexgen"), record_timeline=True)
    hits = sum(e.prefix_cache.hit_tokens for e in sim.engines)
    prompts = sum(e.prompt_tokens_admitted for e in sim.engines)
    assert result["preemptions"] == 0  # so every call was admitted once
    assert prompts == sum(c.input_tokens for c in sim.calls)
    assert result["prefix_cache_hit_rate"] == pytest.approx(hits / prompts)
    assert result["prefill_tokens"] == prompts - hits
    assert result["prefix_cache"] == "on"
    for row, engine in zip(result["engines"], sim.engines):
        assert row["prefix_hit_tokens"] == engine.prefix_cache.hit_tokens
        assert 0.0 <= row["prefix_cache_hit_rate"] <= 1.0
    trace = chrome_trace(sim)
    counters = [e for e in trace["traceEvents"] if e.get("name") == "prefix cache"]
    assert len(counters) == len(sim.engines)
    spans = [e for e in trace["traceEvents"] if e.get("cat") == "call"]
    assert sum(s["args"]["cached"] for s in spans) == hits


@pytest.mark.parametrize("policy", ["llmd-prefix", "sglang-cache-aware", "dynamo-kv", "preble"])
def test_cache_aware_policies_keep_invariants(policy: str) -> None:
    spec = RunSpec(trace="chess_trace2", cluster="mixed-16", rate_qps=0.3, seed=1, queries=40)
    p = load_policy(policy)
    p.reset()
    sim = build_simulator(spec, queue_key=p.queue_key)
    problems = instrument_kv(sim)
    sim.run(p)
    assert not problems, problems[:3]
    check_finished_run(sim)


def test_scenarios_and_cli_switch_the_cache(tmp_path: Path, capsys, monkeypatch) -> None:
    from typer.testing import CliRunner

    from agentsched.cli import _register_all, app
    from envs.gym.scenario import Scenario
    from tests.test_bench import run_main

    spec = Scenario.coerce({"queries": 4, "prefix_cache": False}).run_spec(0)
    assert spec.prefix_cache is False and Scenario.coerce({"queries": 4}).run_spec(0).prefix_cache is True
    assert all(e.prefix_cache is None for e in build_simulator(spec).engines)
    _register_all()
    runner = CliRunner()
    hit = {}
    for switch in ("on", "off"):
        out = tmp_path / f"{switch}.json"
        res = runner.invoke(app, ["simulate", "--rate", "0.05", "--queries", "10", "--policy", "hexgen",
                                  "--prefix-cache", switch, "--out", str(out)])
        assert res.exit_code == 0, res.output
        data = json.loads(out.read_text())
        assert data["prefix_cache"] == switch
        hit[switch] = data["prefix_cache_hit_rate"]
    assert hit["off"] == 0.0 and 0.3 < hit["on"] < 0.9
    for command in ("simulate", "bench", "evaluate"):
        extra = ["--policy", "rr"] if command == "evaluate" else []
        proc = run_main(capsys, monkeypatch, command, *extra, "--prefix-cache", "maybe")
        assert proc.returncode == 2 and "'--prefix-cache': 'maybe' is not one of 'on', 'off'" in proc.stderr, (command, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_observation_v2_has_the_cache_features_and_v1_is_still_built() -> None:
    from envs.observation.dispatch import (
        ENGINE_FEATURES,
        ENGINE_FEATURES_V1,
        N_HEAD,
        OBS_VERSION,
        DispatchObservation,
        engine_block,
    )

    assert OBS_VERSION == 2 and ENGINE_FEATURES[: len(ENGINE_FEATURES_V1)] == ENGINE_FEATURES_V1
    spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.05, seed=0, queries=6)
    policy = load_policy("hexgen")
    sim = build_simulator(spec, queue_key=policy.queue_key)
    v1, v2 = DispatchObservation(4, version=1), DispatchObservation(4)
    assert v1.size == N_HEAD + 4 * len(ENGINE_FEATURES_V1) and v2.size == N_HEAD + 4 * len(ENGINE_FEATURES)
    share, latency = ENGINE_FEATURES.index("cached_share"), ENGINE_FEATURES.index("cached_latency")
    seen_hit = False
    while (call := sim.next_decision()) is not None:
        a, b = v1.build(call, sim), v2.build(call, sim)
        rows1, rows2 = engine_block(a, 4, 1), engine_block(b, 4)
        assert (rows2[:, : len(ENGINE_FEATURES_V1)] == rows1).all()  # v1 features unchanged
        for i, e in enumerate(sim.engines):
            hit = e.cached_prefix_tokens(call)
            assert rows2[i, share] == pytest.approx(hit / call.input_tokens, rel=1e-6)
            assert rows2[i, latency] == pytest.approx(math.log1p(e.expected_call_latency_s(call) / 10.0), rel=1e-5)
            seen_hit |= hit > 0
        sim.dispatch(call, policy.dispatch(call, sim))
    assert seen_hit


def _cache_state(cache: PrefixCache) -> tuple:
    return (cache.cached_blocks, cache.evictable_blocks, list(cache._lru),
            sorted((repr(k), n.blocks, n.cached, n.refs) for k, n in cache.nodes.items()))


def test_take_chain_is_admit_with_a_pool_that_never_runs_out() -> None:
    """The gateway's one-loop acquire: same hits, blocks taken, nodes and cache state as `admit`
    with an unbounded pool, over random chains sharing prefixes, releases and evictions."""
    rng = random.Random(7)
    a, b = PrefixCache(BS), PrefixCache(BS)
    held: list[tuple[list, list]] = []
    for step in range(400):
        op = rng.random()
        if op < 0.55 or not held:
            n_shared = rng.randrange(0, 6)
            chain = [(("root", i), rng.choice((8, 16, 40))) for i in range(n_shared)]
            chain += [((step, i), rng.choice((5, 16, 33))) for i in range(rng.randrange(1, 4))]
            key_tokens: dict = {}
            for k, t in chain:  # a shared key always covers the same tokens
                key_tokens.setdefault(k, t)
            chain = [(k, key_tokens[k]) for k, _ in chain]
            tokens = sum(t for _, t in chain)
            hit_a, need_a, nodes_a = a.admit(chain, tokens, 2**62, 0)
            hit_b, need_b, nodes_b = b.take_chain(chain, tokens)
            assert nodes_a is not None
            assert (hit_a, need_a) == (hit_b, need_b)
            assert [n.key for n in nodes_a] == [n.key for n in nodes_b]
            held.append((nodes_a, nodes_b))
        elif op < 0.9:
            nodes_a, nodes_b = held.pop(rng.randrange(len(held)))
            assert a.release(nodes_a) == b.release(nodes_b)
        else:
            keep = rng.randrange(0, a.evictable_blocks + 1)
            a.evict_down_to(keep)
            b.evict_down_to(keep)
        assert _cache_state(a) == _cache_state(b)
