"""vLLM V1's automatic prefix caching, kept per prompt segment instead of per 16-token block.

What vLLM does (vllm/v1/core/kv_cache_manager.py, block_pool.py, kv_cache_utils.py):
- KV lives in fixed-size blocks; only *full* blocks are cached, each keyed by a hash of its tokens
  and of its parent block's hash, so a block hash names the whole prefix up to that block;
- a new request reuses the longest chain of cached block hashes from its first token
  (`get_computed_blocks`); the last prompt token is always recomputed (a hit is capped at
  `num_tokens - 1`), so a fully cached prompt still prefills one block;
- blocks of finished or preempted requests go back to the free queue, the request's tail blocks
  first, and keep their hash until they are handed out again: allocation pops the least recently
  freed block (LRU eviction); a hit takes a cached block back out of the free queue;
- a block used by running requests (`ref_cnt` > 0) is never evicted, and blocks shared by several
  running requests are allocated once.

Here a prompt is a chain of segments (`LLMCall.segments`: (chain key, tokens) pairs, where the chain
key names the text from the prompt's first token to the segment's end, like a block hash names its
prefix). A `CacheNode` stands for all the full blocks whose last token falls inside one segment of
one chain: its block count, how many of them (a prefix) are still cached, and how many running
calls use it. Lookups, admissions and releases cost one step per segment, never per block.

Simplifications (documented, all second order for CHESS-sized prompts):
- a call's prompt blocks are registered when it is admitted (vLLM registers each scheduled chunk's
  blocks; admission here reserves the whole prompt at once, as the engine model does anyway);
- generated tokens are not cached for reuse (no later prompt here contains an earlier output), and
  a call's partial last block and decode blocks go back to the pool as empty blocks;
- a recomputed segment whose node is still cached behind an evicted parent reuses that node instead
  of allocating a duplicate block (vLLM keeps both copies until one is evicted).
Preemption releases the call's blocks like a finish (they stay cached, so the re-admitted call gets
hits on its own prompt, as in vLLM); an engine failure drops the whole cache (`clear`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Sequence

from mypy_extensions import mypyc_attr


# serializable: `envs.sim.fork` deep-copies engines' caches (also when compiled with mypyc)
def token_block_chain(token_ids: list[int], block_tokens: int, root: int) -> tuple[tuple[Hashable, int], ...]:
    """The segments of a token-id prompt keyed the way vLLM V1 keys its KV blocks: one
    (key, block_tokens) segment per full block, key_i = hash((key_{i-1}, tuple(block i's ids))),
    key_{-1} = `root`, then the ids that do not fill a last block as one more segment keyed the same
    way. Here (compiled with the cache) because the gateway hashes every token prompt with it."""
    n = len(token_ids)
    out: list[tuple[Hashable, int]] = []
    key: int = root
    end = n - n % block_tokens
    # zip over one iterator cuts the blocks' tuples in C (a quarter faster than slicing each)
    for block in zip(*[iter(token_ids[:end])] * block_tokens):
        key = hash((key, block))
        out.append((key, block_tokens))
    if end < n:
        out.append((hash((key, tuple(token_ids[end:]))), n - end))
    return tuple(out)


@mypyc_attr(serializable=True)
class CacheNode:
    """The full blocks of one chain whose last token falls inside one segment."""

    __slots__ = ("key", "blocks", "cached", "refs")

    def __init__(self, key: Hashable, blocks: int, cached: int = 0, refs: int = 0):
        self.key = key
        self.blocks = blocks  # full blocks ending inside the segment
        self.cached = cached  # how many of them (from the segment's start) hold cached KV
        self.refs = refs  # running calls that use them

    def __deepcopy__(self, memo: dict[int, Any]) -> "CacheNode":
        """A fork copies many nodes; their fields are immutable values (see `LLMCall.__deepcopy__`)."""
        twin = CacheNode(self.key, self.blocks, self.cached, self.refs)
        memo[id(self)] = twin
        return twin


def copied_node(node: CacheNode, memo: dict[int, Any]) -> CacheNode:
    """`copy.deepcopy(node, memo)` without its generic dispatch."""
    twin = memo.get(id(node))
    return twin if twin is not None else node.__deepcopy__(memo)


# allow_interpreted_subclasses: built from interpreted code too (see `envs.sim.engine.LLMCall`)
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class PrefixCache:
    """One engine's prefix cache over its KV block pool.

    The engine owns the count of free blocks (blocks no running call uses); cached blocks of nodes
    no running call uses are part of that free pool and are evicted, least recently released first,
    when the pool's empty blocks run out. Invariant: `evictable_blocks` <= the engine's free blocks.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.nodes: dict[Hashable, CacheNode] = {}
        # nodes with refs == 0 and cached > 0, least recently released first
        self._lru: OrderedDict[Hashable, CacheNode] = OrderedDict()
        self.evictable_blocks = 0  # cached blocks no running call uses (inside the free pool)
        self.cached_blocks = 0  # every cached block, in use or not
        # counters over the engine's life (kept across `clear`)
        self.hit_tokens = 0
        self.query_tokens = 0
        self.evicted_blocks = 0
        # bumped whenever the set of nodes running calls use changes (acquire, release, clear):
        # what `blocks_to_take` answers for a chain depends on nothing else
        self.refs_version = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> "PrefixCache":
        """The copy a fork (`envs.sim.fork`) takes of each engine's cache: every node copied once
        (through `memo`, which the calls holding nodes share), both tables rebuilt in their order."""
        twin = PrefixCache(self.block_size)
        memo[id(self)] = twin
        nodes = twin.nodes
        for key, node in self.nodes.items():
            nodes[key] = copied_node(node, memo)
        lru = twin._lru
        for key, node in self._lru.items():
            lru[key] = copied_node(node, memo)
        twin.evictable_blocks = self.evictable_blocks
        twin.cached_blocks = self.cached_blocks
        twin.hit_tokens = self.hit_tokens
        twin.query_tokens = self.query_tokens
        twin.evicted_blocks = self.evicted_blocks
        twin.refs_version = self.refs_version
        return twin

    def clear(self) -> None:
        """Drop every cached block (engine failure); counters stay."""
        self.nodes = {}
        self._lru = OrderedDict()
        self.evictable_blocks = 0
        self.cached_blocks = 0
        self.refs_version += 1

    def hit_tokens_for(self, segments: Sequence[tuple[Hashable, int]], prompt_tokens: int) -> int:
        """Prompt tokens a call would read from the cache now: the longest cached chain of full
        blocks from its first token, at most `prompt_tokens - 1` (vLLM recomputes the last token)."""
        bs = self.block_size
        nodes = self.nodes
        start = 0
        hit_blocks = 0
        for key, tokens in segments:
            end = start + tokens
            first = start // bs
            last = end // bs
            if last > first:
                node = nodes.get(key)
                if node is None:
                    break
                if node.cached < node.blocks:
                    hit_blocks = first + node.cached
                    break
                hit_blocks = last
            start = end
        cap = (prompt_tokens - 1) // bs
        return (hit_blocks if hit_blocks < cap else cap) * bs

    def _scan(self, segments: Sequence[tuple[Hashable, int]],
              prompt_tokens: int) -> tuple[int, int, list[tuple[Hashable, int, CacheNode | None]]]:
        """One pass over a prompt's chain: (hit tokens, blocks it takes from the free pool, and per
        segment holding full blocks its key, block count and node, None if not cached)."""
        bs = self.block_size
        nodes = self.nodes
        start = 0
        hit_blocks = 0
        hitting = True
        need = 0
        found: list[tuple[Hashable, int, CacheNode | None]] = []
        for key, tokens in segments:
            end = start + tokens
            first = start // bs
            last = end // bs
            if last > first:
                node = nodes.get(key)
                if node is None:
                    need += last - first
                    hitting = False
                else:
                    if node.refs == 0:
                        need += last - first
                    if hitting:
                        if node.cached < node.blocks:
                            hit_blocks = first + node.cached
                            hitting = False
                        else:
                            hit_blocks = last
                found.append((key, last - first, node))
            start = end
        cap = (prompt_tokens - 1) // bs
        return (hit_blocks if hit_blocks < cap else cap) * bs, need, found

    def admission(self, segments: Sequence[tuple[Hashable, int]], prompt_tokens: int) -> tuple[int, int]:
        """(`hit_tokens_for`, `blocks_to_take`) in one pass over the segments."""
        hit, need, _ = self._scan(segments, prompt_tokens)
        return hit, need

    def admit(self, segments: Sequence[tuple[Hashable, int]], prompt_tokens: int, free_blocks: int,
              extra_blocks: int) -> tuple[int, int, list[CacheNode] | None]:
        """Admit a call if its blocks fit: `admission`, then, when `blocks_to_take` +
        `extra_blocks` (its private blocks) <= `free_blocks`, `acquire` and `evict_down_to` the
        free blocks left, in one pass over the chain's nodes. Returns (hit tokens, blocks taken
        from the free pool including the extra ones, the acquired nodes or None if it does not fit;
        nothing changed then)."""
        hit, need, found = self._scan(segments, prompt_tokens)
        need += extra_blocks
        if need > free_blocks:
            return hit, need, None
        out = self._take(found)
        free = free_blocks - need
        if self.evictable_blocks > free:
            self.evict_down_to(free)
        return hit, need, out

    def take_chain(self, segments: Sequence[tuple[Hashable, int]], prompt_tokens: int) -> tuple[int, int, list[CacheNode]]:
        """`admit` with a free pool that never runs out, in one loop: (hit tokens, blocks taken from
        the free pool, the acquired nodes). For the gateway's index, which never refuses a call (the
        engine queues what does not fit) and calls `evict_down_to` itself; a chain's keys are
        distinct, so counting a node's blocks before taking it is what `_scan` then `_take` count."""
        bs = self.block_size
        nodes = self.nodes
        start = 0
        hit_blocks = 0
        hitting = True
        need = 0
        out: list[CacheNode] = []
        for key, tokens in segments:
            end = start + tokens
            first = start // bs
            last = end // bs
            start = end
            if last <= first:
                continue
            node = nodes.get(key)
            if node is None:
                hitting = False
                need += last - first
            else:
                if hitting:
                    if node.cached < node.blocks:
                        hit_blocks = first + node.cached
                        hitting = False
                    else:
                        hit_blocks = last
                if node.refs == 0:
                    need += last - first
            out.append(self._take_node(key, last - first, node))
        self.refs_version += 1
        cap = (prompt_tokens - 1) // bs
        return (hit_blocks if hit_blocks < cap else cap) * bs, need, out

    def blocks_to_take(self, segments: Sequence[tuple[Hashable, int]]) -> int:
        """Blocks of the free pool that admitting the call's prompt takes: every block of its
        chain that no running call uses yet (cached ones are taken back out of the free queue,
        missing ones are allocated). The partial last block is not included."""
        return self._scan(segments, 1)[1]

    def acquire(self, segments: Sequence[tuple[Hashable, int]]) -> list[CacheNode]:
        """A call is admitted: its chain's nodes are in use (and registered, so later calls hit
        them). The caller has taken `blocks_to_take` blocks from the free pool and then calls
        `evict_down_to(free blocks)`. Returns the nodes, root first, for `release`."""
        return self._take(self._scan(segments, 1)[2])

    def _take(self, found: list[tuple[Hashable, int, CacheNode | None]]) -> list[CacheNode]:
        """`acquire` of the chain `_scan` found (see `_take_node`)."""
        out = [self._take_node(key, n, node) for key, n, node in found]
        self.refs_version += 1
        return out

    def _take_node(self, key: Hashable, n: int, node: CacheNode | None) -> CacheNode:
        """One segment of an admitted chain, `n` full blocks: a missing node is created cached, an
        unused cached one leaves the LRU queue (its blocks back out of the free pool), and the node
        gains a reference. The caller bumps `refs_version` once per chain."""
        if node is None:
            node = self.nodes[key] = CacheNode(key, n, n, 1)
            self.cached_blocks += n
            return node
        if node.refs == 0:
            cached = node.cached
            if cached:
                del self._lru[key]
                self.evictable_blocks -= cached
            self.cached_blocks += n - cached
            node.cached = n
        node.refs += 1
        return node

    def release(self, acquired: list[CacheNode]) -> int:
        """A call finished or was preempted: its nodes' references drop; nodes no running call uses
        join the LRU queue, the call's tail first (so its tail is evicted first, as in vLLM).
        Returns the blocks that went back to the free pool."""
        lru = self._lru
        freed = 0
        evictable = 0
        for node in reversed(acquired):
            refs = node.refs - 1
            node.refs = refs
            if refs == 0:
                freed += node.blocks
                cached = node.cached
                if cached:
                    lru[node.key] = node
                    evictable += cached
        self.evictable_blocks += evictable
        self.refs_version += 1
        return freed

    def evict_down_to(self, free_blocks: int) -> None:
        """Evict least recently released cached blocks until they fit in the free pool."""
        excess = self.evictable_blocks - free_blocks
        if excess <= 0:
            return
        self.evictable_blocks = free_blocks
        self.cached_blocks -= excess
        self.evicted_blocks += excess
        lru = self._lru
        nodes = self.nodes
        while True:
            node = next(iter(lru.values()))  # the least recently released
            cached = node.cached
            if cached > excess:
                node.cached = cached - excess
                return
            node.cached = 0
            key = node.key
            del lru[key]
            del nodes[key]
            excess -= cached
            if excess == 0:
                return
