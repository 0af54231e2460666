"""The gateway's per-engine prefix index: what each engine's automatic prefix cache holds, predicted
from the prompts the gateway sent it, with the simulator's cache model (`envs.sim.prefix_cache`).

Prompt -> segments (`CallView.segments`: (chain key, tokens) pairs, each key naming the prompt from
its first token to the segment's end):

- **Token-id prompts** (`/v1/completions` with `prompt` a list of ints) are hashed the way vLLM V1
  keys its KV blocks (vllm/v1/core/kv_cache_utils.py, `hash_block_tokens`): the prompt is cut into
  full blocks of `block_tokens` ids and block i's key is hash(key of block i-1, block i's ids), so
  equal keys mean equal prefixes. One segment per full block: merging blocks into one segment
  would keep the keys prefix-naming but lose every hit that ends inside the merged run (a prompt
  that diverges in the middle of it matches none of it), so the gateway keeps vLLM's granularity.
  The ids that do not fill a last block are one more segment; it holds no full block, so the
  cache never stores or looks it up (vLLM caches only full blocks). Keys are Python's hash of
  (parent key, tuple of ids): deterministic for ints, 64-bit, about as cheap as slicing the list.
  They are not vLLM's own hash values (vLLM seeds its chain with a random or PYTHONHASHSEED-derived
  root and hashes with sha256 or the builtin hash, per `--prefix-caching-hash-algo`); the index
  needs only the same *structure*, since it never matches keys against the engine's.
- **Text and chat prompts** are not tokenised (the gateway holds no tokenizer and must stay
  sub-millisecond). They follow the approximation of the prefix-cache scorer llm-d ships in the
  Gateway API Inference Extension (kubernetes-sigs/gateway-api-inference-extension,
  pkg/epp/scheduling/framework/plugins/multi/prefix/plugin.go: a chained hash over fixed-size
  character blocks of the prompt): chunks of `block_tokens x CHARS_PER_TOKEN` characters, each
  standing for one block, chained the same way. A chat prompt is the messages' role and content
  strings in order (the engine applies its chat template around them, which shifts the real block
  boundaries by a few tokens: hits are then predicted a block early or late). The precise
  alternative is llm-d's kv-cache-manager (llm-d/llm-d-kv-cache-manager, pkg/kv-cache/indexer.go,
  the `precise-prefix-cache-scorer`), which tokenises the prompt with the model's tokenizer and
  computes vLLM's own block keys, fed by the engines' KV-cache events; the gateway can follow those
  events too, keyed with its own chain (deploy/gateway/kv_events.py).
- A batch of several prompts in one call gets no segments (no prefix-cache estimate).

With engines of different block sizes the gateway cuts segments at the smallest one: exact for
engines of that size, and an engine whose block size is a multiple of it still finds each of its
blocks' ends at a segment end, so its hits are exact too. `gateway.prefix_segment_tokens` (a
multiple of that block size) cuts coarser segments instead: each then stands for several
consecutive blocks under the key of its last one (still prefix-naming), so lookups take fewer
steps on long prompts with 16-token GPU blocks, and a predicted hit is floored to a multiple of it.

`EnginePrefixIndex` is one engine's `PrefixCache` driven by the gateway's events with the calls the
simulator's `Engine` makes at the same points of a call's life: `admission` + `acquire` +
`evict_down_to(free blocks)` when a call is sent (the simulator: when it is admitted to the batch),
`release` when it finishes or fails, `clear` when the engine restarts. Eviction is bounded by the
engine's KV capacity in blocks. What the gateway cannot see and so does not model: the engine's
own queue (a call counts as holding its prompt's blocks from the moment it is sent, so under
overload the index evicts earlier than the engine), decode blocks, and preemptions.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

from envs.sim.prefix_cache import CacheNode, PrefixCache, token_block_chain

CHARS_PER_TOKEN = 4  # the gateway's rough prompt-size estimate for text (it does not tokenise)
# roots of the three key chains, so that a token prompt, a text prompt and a chat prompt never share keys
TOKEN_ROOT_KEY = 0
TEXT_ROOT_KEY = hash("agentsched text prompt")
CHAT_ROOT_KEY = hash("agentsched chat prompt")

Segments = tuple[tuple[Hashable, int], ...]


def token_segments(token_ids: Sequence[int], block_tokens: int, root: int = TOKEN_ROOT_KEY) -> Segments:
    """The block hash chain of a token-id prompt: one (key, block_tokens) segment per full block,
    key_i = hash((key_{i-1}, tuple(block i's ids))), key_{-1} = `root`; then the rest of the ids
    (fewer than a block) as one segment keyed the same way. Covers len(token_ids) tokens."""
    return token_block_chain(token_ids if isinstance(token_ids, list) else list(token_ids), block_tokens, root)


def text_segments(text: str, input_tokens: int, block_tokens: int, root: int = TEXT_ROOT_KEY,
                  chars_per_token: int = CHARS_PER_TOKEN) -> Segments:
    """llm-d's character-chunk approximation for a text prompt: chunks of block_tokens x
    chars_per_token characters, one block each, chained like token blocks; the rest of the
    prompt's `input_tokens` (the gateway's estimate) as the last segment."""
    chunk = block_tokens * chars_per_token
    full = min(len(text) // chunk, input_tokens // block_tokens)
    out: list[tuple[Hashable, int]] = []
    key: int = root
    for i in range(full):
        key = hash((key, text[i * chunk:(i + 1) * chunk]))
        out.append((key, block_tokens))
    rest = input_tokens - full * block_tokens
    if rest > 0:
        out.append((hash((key, text[full * chunk:])), rest))
    return tuple(out)


def chat_text(messages: list[Any]) -> str:
    """The text of a chat prompt the index hashes: role and content of each message, in order."""
    parts: list[str] = []
    for m in messages:
        content = m.get("content") or ""
        parts.append(str(m.get("role", "")))
        parts.append("\x00")
        parts.append(content if isinstance(content, str) else repr(content))
        parts.append("\x00")
    return "".join(parts)


def is_token_prompt(body: dict[str, Any], chat: bool) -> bool:
    """Whether the request's prompt is token ids (its chain is then vLLM's, block for block)."""
    prompt = body.get("prompt")
    if chat or not isinstance(prompt, list) or not prompt:
        return False
    first = prompt[0]
    return (isinstance(first, int) and not isinstance(first, bool)) or (len(prompt) == 1 and isinstance(first, list))


def prompt_segments(body: dict[str, Any], chat: bool, input_tokens: int, block_tokens: int) -> Segments:
    """The segments of an (already validated) OpenAI request body; () when the structure is unknown."""
    if chat:
        return text_segments(chat_text(body["messages"]), input_tokens, block_tokens, CHAT_ROOT_KEY)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return text_segments(prompt, input_tokens, block_tokens)
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return token_segments(prompt, block_tokens)
        if len(prompt) == 1 and isinstance(first, str):
            return text_segments(first, input_tokens, block_tokens)
        if len(prompt) == 1 and isinstance(first, list):
            return token_segments(first, block_tokens)
    return ()


class EnginePrefixIndex:
    """One engine's prefix cache as the gateway predicts it (see the module docstring).

    `free_blocks` is the engine's KV pool minus the blocks the calls in flight there hold (their
    prompts' chains, shared blocks once, plus each one's partial last block), as in the simulator's
    `Engine`; cached blocks no call in flight uses live in that free pool and are evicted least
    recently released first when it runs out.
    """

    __slots__ = ("cache", "block_tokens", "total_blocks", "free_blocks", "version", "_held")

    def __init__(self, block_tokens: int, capacity_tokens: int) -> None:
        self.cache = PrefixCache(block_tokens)
        self.block_tokens = block_tokens
        self.total_blocks = capacity_tokens // block_tokens
        self.free_blocks = self.total_blocks
        self.version = 0  # bumped by every change of what is cached (lets a reader memoise a lookup)
        # call id -> (cache nodes it uses, its blocks, how many of them are the nodes' shared blocks)
        self._held: dict[int, tuple[list[CacheNode], int, int]] = {}

    @property
    def cached_tokens(self) -> int:
        """Tokens of prompt prefixes the engine is predicted to hold (in use or not)."""
        return self.cache.cached_blocks * self.block_tokens

    def hit_tokens(self, segments: Sequence[tuple[Hashable, int]], prompt_tokens: int) -> int:
        """Prompt tokens the engine would serve from its cache if it took the prompt now."""
        if not segments:
            return 0
        return self.cache.hit_tokens_for(segments, prompt_tokens)

    def acquire(self, call_id: int, segments: Sequence[tuple[Hashable, int]], prompt_tokens: int) -> int:
        """A call was sent to the engine: its prompt's blocks are in use and registered (later
        prompts hit them). Returns the prompt tokens predicted to be read from the cache."""
        if not segments or call_id in self._held:
            return 0
        cache = self.cache
        bs = self.block_tokens
        full = prompt_tokens // bs
        blocks = -(-prompt_tokens // bs)
        self.version += 1
        hit, take, nodes = cache.take_chain(segments, prompt_tokens)  # never refused: the engine queues
        self.free_blocks -= take + blocks - full
        self._fit_cached_blocks()
        cache.hit_tokens += hit
        cache.query_tokens += prompt_tokens
        self._held[call_id] = (nodes, blocks, full)
        return hit

    def release(self, call_id: int) -> None:
        """The call finished or failed: its private blocks go back empty, its chain's blocks cached."""
        held = self._held.pop(call_id, None)
        if held is None:
            return
        nodes, blocks, shared = held
        self.version += 1
        self.free_blocks += blocks - shared + self.cache.release(nodes)
        self._fit_cached_blocks()

    def clear(self) -> None:
        """The engine restarted (or went down): its cache is empty; calls held so far are forgotten
        (their later `release` is a no-op)."""
        self.version += 1
        self.cache.clear()
        self._held = {}
        self.free_blocks = self.total_blocks

    def set_capacity(self, capacity_tokens: int) -> None:
        """The engine's own KV capacity became known (a scrape): resize the pool."""
        total = capacity_tokens // self.block_tokens
        if total == self.total_blocks:
            return
        self.version += 1
        self.free_blocks += total - self.total_blocks
        self.total_blocks = total
        self._fit_cached_blocks()

    def _fit_cached_blocks(self) -> None:
        """Keep the simulator's invariant (cached blocks no call uses fit in the free pool): evict
        the least recently released ones that do not. Calls sent beyond the engine's capacity (it
        queues them; the index cannot see that) drive the pool below zero: then nothing is spare."""
        free = self.free_blocks if self.free_blocks > 0 else 0
        if self.cache.evictable_blocks > free:
            self.cache.evict_down_to(free)


__all__ = ["CHARS_PER_TOKEN", "EnginePrefixIndex", "Segments", "chat_text", "is_token_prompt", "prompt_segments",
           "text_segments", "token_segments"]
