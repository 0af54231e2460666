"""Invariant checks of a simulator run, shared by the example-based and the fuzz tests."""

from __future__ import annotations

import math

from envs.sim.cluster import ClusterSimulator


def instrument_kv(sim: ClusterSimulator) -> list[str]:
    """Wrap every engine so that KV accounting is checked after each plan and completion."""
    problems: list[str] = []
    for engine in sim.engines:
        def check(tag: str, engine=engine) -> None:
            # blocks shared by running calls (prefix-cache nodes in use) count once
            held = sum(seq.blocks - seq.shared_blocks for seq in engine.running)
            cache = engine.prefix_cache
            if cache is not None:
                refs: dict[int, int] = {}
                for seq in engine.running:
                    for node in seq.cache_nodes or ():
                        refs[id(node)] = refs.get(id(node), 0) + 1
                in_use = [n for n in cache.nodes.values() if n.refs > 0]
                held += sum(n.blocks for n in in_use)
                if any(n.refs != refs.get(id(n), 0) for n in cache.nodes.values()):
                    problems.append(f"{engine.name} {tag}: a cache node's reference count is not its running calls")
                if any(n.cached != n.blocks for n in in_use):
                    problems.append(f"{engine.name} {tag}: blocks of a running call were evicted")
                evictable = sum(n.cached for n in cache.nodes.values() if n.refs == 0)
                for entry in engine.waiting[:3]:  # the one-pass admission walk agrees with the view's
                    seq = entry[2]
                    if seq.segments and cache.admission(seq.segments, seq.prefill_left) != (
                            cache.hit_tokens_for(seq.segments, seq.prefill_left), cache.blocks_to_take(seq.segments)):
                        problems.append(f"{engine.name} {tag}: admission walk disagrees with hit_tokens_for/blocks_to_take")
                if evictable != cache.evictable_blocks or evictable > engine.free_blocks:
                    problems.append(f"{engine.name} {tag}: KV used {engine.total_blocks - engine.free_blocks} + cached "
                                    f"{evictable} (counted {cache.evictable_blocks}) > capacity {engine.total_blocks}")
            elif any(seq.shared_blocks or seq.cache_nodes for seq in engine.running):
                problems.append(f"{engine.name} {tag}: shared blocks without a prefix cache")
            if engine.free_blocks < 0:
                problems.append(f"{engine.name} {tag}: free blocks {engine.free_blocks} < 0")
            if held + engine.free_blocks != engine.total_blocks:
                problems.append(f"{engine.name} {tag}: held {held} + free {engine.free_blocks} != {engine.total_blocks}")
            if any(entry[2].blocks for entry in engine.waiting):
                problems.append(f"{engine.name} {tag}: a waiting call holds KV blocks")
            if len(engine.running) > engine.max_num_seqs:
                problems.append(f"{engine.name} {tag}: {len(engine.running)} running > max_num_seqs")

        plan, complete = engine.plan, engine.complete

        def wrapped_plan(now, cb, plan=plan, check=check):
            out = plan(now, cb)
            check("plan")
            return out

        def wrapped_complete(now, complete=complete, check=check):
            out = complete(now)
            check("complete")
            return out

        engine.plan = wrapped_plan  # type: ignore[method-assign]
        engine.complete = wrapped_complete  # type: ignore[method-assign]
    return problems


def check_finished_run(sim: ClusterSimulator) -> None:
    """Every call finished once (or its workflow is accounted failed); times ordered; stages respected."""
    assert sim.done, "events left after the run"
    for c in sim.calls:  # a prompt's segments cover it exactly (or it has none)
        assert not c.segments or sum(t for _, t in c.segments) == c.input_tokens, f"segments of call {c.call_id}"
    for wf in sim.workflows:
        assert not math.isnan(wf.finish_time_s), f"workflow {wf.workflow_id} never finished"
        if wf.failed:
            continue
        prev_stage_end = wf.arrival_time_s
        for stage in wf.stages:
            ready = {c.ready_time_s for c in stage}
            assert len(ready) == 1, "fan-out members become ready together"
            assert ready.pop() >= prev_stage_end - 1e-9, "a stage started before its predecessor finished"
            for c in stage:
                assert c.engine_id >= 0
                assert c.ready_time_s <= c.dispatch_time_s <= c.admit_time_s + 1e-9
                assert c.admit_time_s <= c.first_token_time_s <= c.finish_time_s + 1e-9
                assert c.generated == c.output_tokens, "a call produced the wrong number of tokens"
            # a fan-out stage ends when its last member does
            prev_stage_end = max(c.finish_time_s for c in stage)
        assert wf.finish_time_s == prev_stage_end
    for engine in sim.engines:
        assert not engine.running and not engine.waiting
        assert engine.free_blocks == engine.total_blocks
        assert abs(engine.outstanding_work_s) < 1e-6
        if engine.timeline:
            for (s0, d0, _, _), (s1, _, _, _) in zip(engine.timeline, engine.timeline[1:]):
                assert d0 >= 0
                assert s1 >= s0 + d0 - 1e-9, f"{engine.name}: iterations overlap or time went back"
