"""One serving engine, modelled on vLLM's (v1) scheduler.

Iteration-level continuous batching with a token budget per iteration (`max_num_batched_tokens`)
and a cap on running sequences (`max_num_seqs`); chunked prefill (running requests first, then
waiting ones in the local policy's order); a paged KV cache whose block count comes from the
memory left after weights; preemption by recompute (the lowest-priority running request frees
its blocks and goes back to the queue) when a block cannot be allocated; optionally vLLM's automatic
prefix caching (`envs.sim.prefix_cache`): an admitted call starts with the longest cached prefix of
its prompt already in KV (`kv_tokens = hit`, `prefill_left = prompt - hit`; the uncached prefill
still attends to the cached context), and cached blocks no running call uses fill the free pool
until it needs them.

The engine does not step token by token: when an iteration would contain only decodes and no
waiting request can be admitted, it plans a *decode segment* of k identical iterations (k = until
the first sequence finishes or the KV cache fills) whose duration is closed-form. An arrival
interrupts a segment at the end of the iteration in progress, exactly as in vLLM, where a new
request joins the batch at the next iteration.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any, Callable, Hashable

from mypy_extensions import mypyc_attr

from envs.sim.config import EngineConfig
from envs.sim.model import EngineModel, LedgerMixin, StepTokens, WorkLedger, build_engine_model
from envs.sim.perf import DecodeSegmentCost, IterationModel
from envs.sim.prefix_cache import CacheNode, PrefixCache, copied_node
from envs.sim.view import CallView


def _key_of(call: "LLMCall") -> float:
    return call.key


# serializable: `envs.sim.fork` deep-copies it (also when compiled with mypyc). allow_interpreted_subclasses:
# built from interpreted code too, and mypyc (2.4) runs __init__ of a serializable class built that way only
# with it (its tp_init is otherwise empty); no interpreted subclass exists
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class LLMCall:
    """A call of a workflow, with its runtime state. Satisfies `CallView`."""

    __slots__ = (
        "call_id", "workflow_id", "tenant", "step", "stage_index", "fanout", "input_tokens", "output_tokens",
        "ready_time_s", "deadline_s", "workflow_deadline_s", "priority", "position",
        # placement and timing
        "engine_id", "dispatch_time_s", "admit_time_s", "first_token_time_s", "finish_time_s",
        "expected_s", "key", "preemptions", "attempts",
        # engine-side progress
        "prefill_left", "generated", "kv_tokens", "blocks",
        # prompt structure and prefix-cache state: (chain key, tokens) per segment (empty: unknown);
        # the cache nodes the call uses while admitted, how many of its blocks are those nodes'
        # (shared) blocks, and the prompt tokens its last admission read from the cache
        "segments", "cache_nodes", "shared_blocks", "cached_tokens",
    )

    def __init__(self, call_id: int, workflow_id: int, tenant: str, step: str, stage_index: int, fanout: int,
                 input_tokens: int, output_tokens: int, priority: int,
                 segments: tuple[tuple[Hashable, int], ...] = ()):
        self.call_id = call_id
        self.workflow_id = workflow_id
        self.tenant = tenant
        self.step = step
        self.stage_index = stage_index
        self.fanout = fanout
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.priority = priority
        self.position = 0
        self.ready_time_s = math.nan
        self.deadline_s = math.inf
        self.workflow_deadline_s = math.inf
        self.engine_id = -1
        self.dispatch_time_s = math.nan
        self.admit_time_s = math.nan
        self.first_token_time_s = math.nan
        self.finish_time_s = math.nan
        self.expected_s = 0.0
        self.key = 0.0
        self.preemptions = 0
        self.attempts = 0
        self.segments = segments
        self.cached_tokens = 0
        # reset_progress(), inline (a call per simulated call)
        self.prefill_left = input_tokens
        self.generated = 0
        self.kv_tokens = 0
        self.blocks = 0
        self.cache_nodes: list[CacheNode] | None = None
        self.shared_blocks = 0

    def reset_progress(self) -> None:
        self.prefill_left = self.input_tokens
        self.generated = 0
        self.kv_tokens = 0
        self.blocks = 0
        self.cache_nodes = None
        self.shared_blocks = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> "LLMCall":
        """The copy a fork (`envs.sim.fork`) takes, field by field: a generic deep copy goes through
        a state dict per call and was most of a fork's time. Every field is immutable but the cache
        nodes, which are copied through `memo`, so they stay the very nodes of the engine's copied
        cache."""
        twin = LLMCall(self.call_id, self.workflow_id, self.tenant, self.step, self.stage_index, self.fanout,
                       self.input_tokens, self.output_tokens, self.priority, self.segments)
        memo[id(self)] = twin
        twin.position = self.position
        twin.ready_time_s = self.ready_time_s
        twin.deadline_s = self.deadline_s
        twin.workflow_deadline_s = self.workflow_deadline_s
        twin.engine_id = self.engine_id
        twin.dispatch_time_s = self.dispatch_time_s
        twin.admit_time_s = self.admit_time_s
        twin.first_token_time_s = self.first_token_time_s
        twin.finish_time_s = self.finish_time_s
        twin.expected_s = self.expected_s
        twin.key = self.key
        twin.preemptions = self.preemptions
        twin.attempts = self.attempts
        twin.prefill_left = self.prefill_left
        twin.generated = self.generated
        twin.kv_tokens = self.kv_tokens
        twin.blocks = self.blocks
        twin.shared_blocks = self.shared_blocks
        twin.cached_tokens = self.cached_tokens
        if self.cache_nodes is not None:
            twin.cache_nodes = [copied_node(node, memo) for node in self.cache_nodes]
        return twin

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"LLMCall({self.call_id}, wf={self.workflow_id}, {self.step}, in={self.input_tokens}, out={self.output_tokens})"


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # as LLMCall
class Engine(LedgerMixin):
    """Satisfies `EngineView`. The simulator drives it through plan()/complete()/enqueue().

    Its static facts (expected latencies, limits, KV capacity, price) are its `EngineModel`, the
    one the deploy gateway builds for the same engine; they are copied into attributes here only
    because the scheduling loop reads them on every iteration."""

    def __init__(self, engine_id: int, model: EngineModel, config: EngineConfig, prefix_cache: bool = False):
        self.engine_id = engine_id
        self.model = model
        self.name = model.name
        self.gpu = model.gpu
        self.config = config
        self.tp = config.tp
        self.price_per_hour = model.price_per_hour
        assert model.perf is not None, "a simulated engine needs an iteration model"
        self.perf: IterationModel = model.perf
        self.request_overhead_s = model.request_overhead_s
        self.call_engine_s = model.call_engine_s
        self.call_frontend_s = model.call_frontend_s
        self.idle_wake_s = model.idle_wake_s
        self.idle_wake_tau_s = model.idle_wake_tau_s
        self.max_num_seqs = model.max_num_seqs
        self.max_num_batched_tokens = model.max_num_batched_tokens
        self.block_size = model.block_size_tokens
        self.kv_capacity_tokens = model.kv_capacity_tokens
        self.total_blocks = model.kv_capacity_tokens // self.block_size
        self.expected_latency_s = model.expected_latency_s  # EngineView
        self.ledger = WorkLedger()
        # dynamic state
        self.healthy = True
        self.waiting: list[tuple[float, int, LLMCall]] = []  # heap by (queue key, arrival order)
        self.running: list[LLMCall] = []
        self.free_blocks = self.total_blocks
        self.busy_s = 0.0
        self.kv_block_seconds = 0.0
        self.preemptions = 0
        self.version = 0  # bumps invalidate a scheduled completion event
        self.frontend_free_s = 0.0  # when the API server is done with the calls sent so far
        self.in_frontend: deque[LLMCall] = deque()  # sent here, not yet seen by the scheduler (FIFO)
        self.busy_until_s = math.nan  # end of the planned iteration/segment, nan when idle
        self.idle_since_s = 0.0  # when the engine last ran out of work; nan while it has some
        self._enqueue_seq = 0
        # calls queued with a key at or above this are background work: admitted only into a batch
        # that runs no other call (the simulator sets it for deferred workflows; inf: none)
        self.background_key_s = math.inf
        # the plan in flight
        self._seg_start_s = 0.0
        self._seg_k = 0
        self._seg_cost: DecodeSegmentCost | None = None
        self._plan_prefills: list[tuple[LLMCall, int]] = []
        self._plan_decodes: list[LLMCall] = []
        self.timeline: list[tuple[float, float, int, int]] | None = None  # (start, dur, prefill tokens, decodes)
        # cap on iterations per decode segment; 1 turns fast-forward off (tests compare both)
        self.max_segment_iterations: int | None = None
        # vLLM's automatic prefix caching (None: off); blocks of the engine's own block size
        self.prefix_cache: PrefixCache | None = PrefixCache(self.block_size) if prefix_cache else None
        self.prefill_tokens_computed = 0  # prompt tokens actually prefilled (hits excluded, recomputes included)
        self.prompt_tokens_admitted = 0  # prompt tokens of every admission (vLLM's prefix_cache_queries)
        # the blocks the head waiting call's chain would take, remembered from a failed admission
        # for as long as no running call's chain changes (`PrefixCache.refs_version`)
        self._take_call: LLMCall | None = None
        self._take_version = -1
        self._take_blocks = 0

    @classmethod
    def from_config(cls, engine_id: int, config: EngineConfig, step_tokens: StepTokens | None = None,
                    prefix_cache: bool = False) -> "Engine":
        """An engine on its own (tests, calibration): its model built as the simulator builds it."""
        return cls(engine_id, build_engine_model(config, step_tokens or StepTokens({})), config, prefix_cache)

    # ---- EngineView -----------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Calls sent here and not yet in the batch: in the API server or in the scheduler's queue
        (the gateway counts the same: sent beyond the batch, plus its own queue)."""
        return len(self.waiting) + len(self.in_frontend)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 1.0

    # ---- EngineView: prefix cache ------------------------------------------------------------
    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens of prompt prefixes held in this engine's cache (in use or not); 0 when off."""
        cache = self.prefix_cache
        return cache.cached_blocks * self.block_size if cache is not None else 0

    def cached_prefix_tokens(self, call: CallView) -> int:
        """Prompt tokens of `call` this engine would read from its prefix cache if admitted now."""
        cache = self.prefix_cache
        if cache is None or not call.segments:
            return 0
        return cache.hit_tokens_for(call.segments, call.input_tokens)

    def expected_call_latency_s(self, call: CallView) -> float:
        """Expected latency of `call` alone on this engine given its cache hits here now (exactly
        T_e(s) without hits; `EngineModel.expected_latency_with_hits_s`)."""
        cache = self.prefix_cache
        if cache is not None:
            segments = call.segments
            if segments:
                hit = cache.hit_tokens_for(segments, call.input_tokens)
                if hit:
                    return self.model.expected_latency_with_hits_s(call.step, call.input_tokens, hit)
        return self.expected_latency_s(call.step)

    def fits(self, call: LLMCall) -> bool:
        """Whether the call's whole context can ever fit in this engine's KV cache."""
        return call.input_tokens + call.output_tokens <= self.kv_capacity_tokens

    # ---- driving -----------------------------------------------------------------------------
    def enqueue(self, call: LLMCall, key: float) -> None:
        call.key = key
        self._enqueue_seq += 1
        heapq.heappush(self.waiting, (key, self._enqueue_seq, call))

    def frontend_ready_s(self, now_s: float) -> float:
        """When a call sent now reaches the scheduler: the API server takes calls one at a time."""
        ready = max(now_s, self.frontend_free_s) + self.call_frontend_s
        self.frontend_free_s = ready
        return ready

    def stretch(self, extra_s: float) -> float | None:
        """The plan in flight loses `extra_s` of CPU to the API server (it shares the engine's
        core): it ends that much later. Returns the new end, or None when idle."""
        if math.isnan(self.busy_until_s):
            return None
        self._seg_start_s += extra_s  # a decode segment's iteration count stays right for interrupt()
        self.busy_until_s += extra_s
        self.busy_s += extra_s
        return self.busy_until_s

    def interrupt(self, now_s: float) -> float | None:
        """Cut a planned decode segment at the end of the iteration in progress; the new end time,
        or None if the plan stays as it is."""
        if self._seg_k <= 1 or self._seg_cost is None:
            return None
        done = self._seg_cost.iterations_within(now_s - self._seg_start_s, self._seg_k)
        new_k = done + 1
        if new_k >= self._seg_k:
            return None
        self._seg_k = new_k
        self.busy_until_s = self._seg_start_s + self._seg_cost.total_s(new_k)
        return self.busy_until_s

    def plan(self, now_s: float, on_preempt: Callable[[LLMCall], None]) -> float | None:
        """Plan the next iteration (or decode segment) starting now; returns its end time, or None
        when there is nothing to run."""
        running = self.running
        waiting = self.waiting
        if not running and not waiting:
            self._go_idle(now_s)
            return None
        budget = self.max_num_batched_tokens
        bs = self.block_size
        cache = self.prefix_cache
        prefills: list[tuple[LLMCall, int]] = []
        decodes: list[LLMCall] = []
        any_preempted = False
        # free blocks in a local while no call is preempted; blocks taken from the free pool
        # evict cached ones (LRU) in one go before the cache is next read or changed: evicting
        # from the LRU head in one go or block by block evicts the same blocks
        free = self.free_blocks
        # 1) running requests, in admission order; allocate KV, preempting from the back if needed
        if len(running) <= free:
            # each call needs at most one new block: none can run short, nobody is preempted
            for seq in running:
                left = seq.prefill_left
                if left > 0:
                    chunk = left if left < budget else budget
                    if chunk > 0:
                        prefills.append((seq, chunk))
                        budget -= chunk
                elif budget > 0:
                    if seq.kv_tokens >= seq.blocks * bs:  # the next token opens a block
                        free -= 1
                        seq.blocks += 1
                    decodes.append(seq)
                    budget -= 1
            i = len(running)
        else:
            i = 0
        while i < len(running):
            seq = running[i]
            left = seq.prefill_left
            if left > 0:
                chunk = left if left < budget else budget
                if chunk <= 0:
                    i += 1
                    continue
                need = 0  # a prompt's blocks are all allocated when it is admitted
            else:
                if budget <= 0:
                    i += 1
                    continue
                chunk = 0
                need = 1 if seq.kv_tokens >= seq.blocks * bs else 0  # the next token opens a block
            if need > free:
                self.free_blocks = free
                if cache is not None and cache.evictable_blocks > free:
                    cache.evict_down_to(free)
                preempted_self = False
                while need > self.free_blocks:
                    # vLLM preempts the lowest-priority running request (largest queue key, latest
                    # admitted on ties) among those not yet scheduled in this iteration
                    victim = max(reversed(running[i:]), key=_key_of)
                    self._preempt(victim)
                    on_preempt(victim)
                    any_preempted = True
                    if victim is seq:
                        preempted_self = True
                        break
                free = self.free_blocks
                if preempted_self:
                    continue
            if need:
                free -= need
                seq.blocks += need
            if chunk:
                prefills.append((seq, chunk))
                budget -= chunk
            else:
                decodes.append(seq)
                budget -= 1
            i += 1
        self.free_blocks = free
        if cache is not None and cache.evictable_blocks > free:
            cache.evict_down_to(free)
        # 2) admit waiting requests in the local policy's order (not in an iteration that had to
        #    preempt: memory is short). Admission reserves the whole prompt's blocks, so a
        #    half-prefilled prompt never has to evict others to continue.
        new_calls = 0
        if waiting and budget > 0 and not any_preempted:
            max_num_seqs = self.max_num_seqs
            background_key_s = self.background_key_s
            while waiting and budget > 0 and len(running) < max_num_seqs:
                if waiting[0][0] >= background_key_s and any(r.key < background_key_s for r in running):
                    break  # background work (a deferred workflow's call) joins only a batch of background work
                seq = waiting[0][2]
                prompt = seq.prefill_left  # a waiting call holds no KV: its whole prompt (+ output so far)
                segments = seq.segments
                if cache is not None and segments:
                    # blocks its chain takes from the free pool (cached ones back out of the free
                    # queue) + its partial last block and recomputed output
                    full = seq.input_tokens // bs
                    blocks = -(-prompt // bs)
                    if (self._take_call is seq and self._take_version == cache.refs_version
                            and self._take_blocks + blocks - full > free):
                        # the same head call as last time and no running call's chain changed:
                        # it takes the same blocks (evictions do not change what it takes)
                        break
                    hit, need, nodes = cache.admit(segments, prompt, free, blocks - full)
                    if nodes is None:
                        self._take_call = seq
                        self._take_version = cache.refs_version
                        self._take_blocks = need - (blocks - full)
                        break
                    heapq.heappop(waiting)
                    seq.cache_nodes = nodes
                    free -= need
                    seq.shared_blocks = full
                    seq.blocks = blocks
                    seq.kv_tokens = hit
                    left = prompt - hit
                    seq.prefill_left = left
                    seq.cached_tokens = hit
                    cache.hit_tokens += hit
                    cache.query_tokens += prompt
                else:
                    need = -(-prompt // bs)
                    if need > free:
                        break
                    heapq.heappop(waiting)
                    free -= need
                    seq.blocks += need
                    left = prompt
                self.prompt_tokens_admitted += prompt
                chunk = left if left < budget else budget
                if seq.admit_time_s != seq.admit_time_s:  # nan: first admission
                    seq.admit_time_s = now_s
                    new_calls += 1
                running.append(seq)
                prefills.append((seq, chunk))
                budget -= chunk
            self.free_blocks = free
        self._seg_start_s = now_s
        self._plan_prefills = prefills
        self._plan_decodes = decodes
        if prefills:
            p_tokens = 0
            p_ctx = 0
            pairs = 0.0
            for seq, chunk in prefills:
                kv = seq.kv_tokens
                p_tokens += chunk
                p_ctx += kv + chunk
                pairs += chunk * (kv + (chunk + 1) * 0.5)
            d_ctx = 0
            for seq in decodes:
                d_ctx += seq.kv_tokens + 1
            dur = self.perf.iteration_s(p_tokens, p_ctx, pairs, len(decodes), d_ctx) + new_calls * self.call_engine_s
            self._seg_k = 1
            self._seg_cost = None
        elif decodes:
            # pure decode: how many identical iterations until something changes?
            first = decodes[0]
            k = first.output_tokens - first.generated
            ctx0 = 0
            for seq in decodes:
                ctx0 += seq.kv_tokens + 1
                left = seq.output_tokens - seq.generated
                if left < k:
                    k = left
            if self.max_segment_iterations is not None:
                k = min(k, self.max_segment_iterations)
            if k > 1 and len(decodes) * (-(-k // bs)) > free:
                k = self._kv_limited_iterations(decodes, k)
            cost = self.perf.decode_segment(len(decodes), ctx0)
            dur = cost.total_s(k)
            self._seg_k = k
            self._seg_cost = cost
        else:
            self._go_idle(now_s)
            return None
        idle_since = self.idle_since_s
        if idle_since == idle_since:  # the first iteration after idle time
            self.idle_since_s = math.nan
            if self.idle_wake_s > 0.0:
                dur += self.idle_wake_s * -math.expm1((idle_since - now_s) / self.idle_wake_tau_s)
        end = now_s + dur
        self.busy_until_s = end
        return end

    def _go_idle(self, now_s: float) -> None:
        """Nothing to run: no plan in flight, and the engine idle from now (if it was not already)."""
        self.busy_until_s = math.nan
        self._seg_k = 0
        if self.idle_since_s != self.idle_since_s:
            self.idle_since_s = now_s

    def _kv_limited_iterations(self, decodes: list[LLMCall], k: int) -> int:
        """Largest k' <= k such that the blocks the first k' iterations allocate fit (the first
        iteration's block is already allocated by plan())."""
        bs = self.block_size
        free = self.free_blocks

        def extra(kk: int) -> int:
            total = 0
            for seq in decodes:
                more = -(-(seq.kv_tokens + kk) // bs) - seq.blocks
                if more > 0:
                    total += more
            return total

        # cheap bound: each sequence needs at most ceil(kk/bs) new blocks
        if len(decodes) * (-(-k // bs)) <= free or extra(k) <= free:
            return k
        lo, hi = 1, k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if extra(mid) <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def complete(self, now_s: float) -> list[LLMCall]:
        """Apply the planned iteration/segment that ends now; returns the calls that finished."""
        duration = now_s - self._seg_start_s
        self.busy_s += duration
        free = self.free_blocks
        self.kv_block_seconds += (self.total_blocks - free) * duration
        prefills = self._plan_prefills
        decodes = self._plan_decodes
        if self.timeline is not None:
            self.timeline.append((self._seg_start_s, duration, sum(c for _, c in prefills), len(decodes)))
        finished: list[LLMCall] = []
        k = self._seg_k
        if prefills:
            computed = 0
            for seq, chunk in prefills:
                computed += chunk
                seq.kv_tokens += chunk
                left = seq.prefill_left - chunk
                seq.prefill_left = left
                if left == 0:
                    generated = seq.generated + 1
                    seq.generated = generated
                    if seq.first_token_time_s != seq.first_token_time_s:  # nan: the first token
                        seq.first_token_time_s = now_s
                    if generated >= seq.output_tokens:
                        finished.append(seq)
            self.prefill_tokens_computed += computed
        if k > 1:
            bs = self.block_size
            for seq in decodes:
                kv = seq.kv_tokens + k
                seq.kv_tokens = kv
                generated = seq.generated + k
                seq.generated = generated
                blocks = -(-kv // bs)
                if blocks > seq.blocks:
                    free -= blocks - seq.blocks
                    seq.blocks = blocks
                if generated >= seq.output_tokens:
                    finished.append(seq)
            self.free_blocks = free
            cache = self.prefix_cache
            if cache is not None and cache.evictable_blocks > free:
                cache.evict_down_to(free)  # the segment's new blocks, evicted in one go (see plan)
        else:
            for seq in decodes:
                seq.kv_tokens += k
                generated = seq.generated + k
                seq.generated = generated
                if generated >= seq.output_tokens:
                    finished.append(seq)
        if finished:
            running = self.running
            for seq in finished:
                running.remove(seq)  # identity: a call is in the batch once
            for seq in finished:
                self._release_blocks(seq)
                seq.finish_time_s = now_s
        self._plan_prefills = []
        self._plan_decodes = []
        self._seg_k = 0
        self._seg_cost = None
        self.busy_until_s = math.nan
        return finished

    def _release_blocks(self, seq: LLMCall) -> None:
        """A call leaves the running batch: its private blocks go back to the free pool as empty
        blocks, its prompt chain's blocks as cached ones (evicted LRU when needed)."""
        nodes = seq.cache_nodes
        if nodes is not None:
            cache = self.prefix_cache
            assert cache is not None, "a call holds cache nodes only on an engine with a prefix cache"
            self.free_blocks += seq.blocks - seq.shared_blocks + cache.release(nodes)
            seq.cache_nodes = None
            seq.shared_blocks = 0
        else:
            self.free_blocks += seq.blocks
        seq.blocks = 0

    def _preempt(self, seq: LLMCall) -> None:
        self.running.remove(seq)
        self._release_blocks(seq)
        # recompute: the prompt and what was generated so far are prefilled again
        seq.prefill_left = seq.input_tokens + seq.generated
        seq.kv_tokens = 0
        seq.preemptions += 1
        self.preemptions += 1
        self._enqueue_seq += 1
        heapq.heappush(self.waiting, (seq.key, -self._enqueue_seq, seq))

    def drain(self) -> list[LLMCall]:
        """Take every running and waiting call off the engine (failure); progress is lost."""
        calls = list(self.running) + [entry[2] for entry in self.waiting] + list(self.in_frontend)
        self.in_frontend.clear()
        for seq in calls:
            seq.reset_progress()
            seq.admit_time_s = math.nan
            seq.first_token_time_s = math.nan
        self.running = []
        self.waiting = []
        self.free_blocks = self.total_blocks
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # a failed engine restarts with an empty cache
        self.ledger.clear_outstanding()
        self._plan_prefills = []
        self._plan_decodes = []
        self._seg_k = 0
        self._seg_cost = None
        self.busy_until_s = math.nan
        self.version += 1
        self.frontend_free_s = 0.0
        return calls
