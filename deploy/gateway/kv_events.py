"""vLLM's KV-cache events as the gateway's prefix index: what an engine's cache really holds.

An engine started with `--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:PORT"}'` publishes, once per scheduler step that changed its cache, a ZMQ
message (topic, 8-byte big-endian sequence number, msgpack `EventBatch` = [ts, events, ...]) whose
events are `BlockStored` (vLLM block hashes, the parent block's hash, the blocks' token ids, block
size, LoRA, medium), `BlockRemoved` (hashes) and `AllBlocksCleared` (vllm/distributed/kv_events.py;
an endpoint without `*` makes the engine connect instead of bind). Recent vLLM encodes each event
as a map with a `type` tag; older versions as an array with the tag first; both are read.

`KVEventIndex` keys every stored block with the gateway's own chain (prefix_index.token_segments:
key = hash(parent's key, block's ids), the root for a block without parent), keeping a map from
vLLM's hash to that key, so it needs no copy of vLLM's hash function or seed: a call's token-id
chain then hits exactly the blocks the engine reported stored and not yet removed. Blocks stored
with a LoRA adapter or extra keys (multimodal inputs, cache salt) are not what a plain prompt
matches and are skipped; so are blocks of another medium than the engine's device cache (CPU
offload tiers). A gap in the sequence numbers (dropped messages) or numbers going back (the engine
restarted) clears the index: it then under-predicts until the engine's next events, never
over-predicts a block it may have lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Hashable, Sequence

import msgspec
import zmq
import zmq.asyncio

from deploy.gateway.prefix_index import TOKEN_ROOT_KEY

log = logging.getLogger("agentsched.gateway")

DEVICE_MEDIA = (None, "GPU")  # vLLM names its device KV cache "GPU" (the CPU build too)


def _fields(event: Any) -> tuple[str, dict[str, Any]]:
    """(type, fields) of one decoded event: a tagged map (current vLLM) or a tagged array (older)."""
    if isinstance(event, dict):
        return str(event.get("type", "")), event
    if isinstance(event, (list, tuple)) and event:
        kind = str(event[0])
        names = {"BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
                 "BlockRemoved": ("block_hashes", "medium")}.get(kind, ())
        return kind, dict(zip(names, event[1:]))
    return "", {}


class KVEventIndex:
    """One engine's cached prompt blocks, as its KV-cache events report them."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._key_of: dict[Hashable, int] = {}  # vLLM block hash -> the gateway's chain key of the block
        self._copies: dict[Hashable, int] = {}  # vLLM block hash -> physical blocks stored under it
        self._stored: dict[int, int] = {}  # chain key -> vLLM hashes stored under it
        self.last_seq = -1
        self.batches = 0  # event batches applied since the gateway started
        self.resets = 0  # gaps, restarts and AllBlocksCleared seen
        self.skipped_blocks = 0  # stored blocks it could not key (unknown parent, LoRA, other medium or size)

    @property
    def live(self) -> bool:
        """Whether the engine's events have been heard (before that the gateway predicts instead)."""
        return self.batches > 0

    @property
    def cached_tokens(self) -> int:
        return len(self._stored) * self.block_tokens

    def clear(self) -> None:
        self._key_of = {}
        self._copies = {}
        self._stored = {}

    def hit_tokens(self, segments: Sequence[tuple[Hashable, int]], prompt_tokens: int) -> int:
        """Prompt tokens the engine would read from its cache now: the run of the call's full-block
        segments (its token-id chain at this block size) that the engine holds, from the first,
        at most prompt_tokens - 1 (vLLM recomputes the last token)."""
        bs = self.block_tokens
        stored = self._stored
        hit = 0
        for key, tokens in segments:
            if tokens != bs or key not in stored:
                break
            hit += bs
        cap = (prompt_tokens - 1) // bs * bs
        return hit if hit < cap else cap

    def apply_message(self, seq: int, payload: bytes) -> None:
        """One ZMQ message of the engine's publisher (sequence number, msgpack batch)."""
        if self.last_seq >= 0 and seq != self.last_seq + 1:
            what = "restarted" if seq <= self.last_seq else f"dropped {seq - self.last_seq - 1} event batches"
            log.warning("KV events: the engine %s; its index is cleared", what)
            self.clear()
            self.resets += 1
        self.last_seq = seq
        batch = msgspec.msgpack.decode(payload)
        events = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else []
        for event in events:
            self.apply(event)
        self.batches += 1

    def apply(self, event: Any) -> None:
        kind, f = _fields(event)
        if kind == "BlockStored":
            self._stored_blocks(f)
        elif kind == "BlockRemoved":
            if f.get("medium") not in DEVICE_MEDIA:
                return
            for block_hash in f.get("block_hashes") or ():
                copies = self._copies.get(block_hash, 0) - 1
                if copies > 0:
                    self._copies[block_hash] = copies
                    continue
                self._copies.pop(block_hash, None)
                key = self._key_of.pop(block_hash, None)
                if key is None:
                    continue
                left = self._stored.get(key, 0) - 1
                if left > 0:
                    self._stored[key] = left
                else:
                    self._stored.pop(key, None)
        elif kind == "AllBlocksCleared":
            self.clear()
            self.resets += 1

    def _stored_blocks(self, f: dict[str, Any]) -> None:
        hashes = f.get("block_hashes") or []
        bs = f.get("block_size") or self.block_tokens
        parent = f.get("parent_block_hash")
        parent_key = TOKEN_ROOT_KEY if parent is None else self._key_of.get(parent)
        if (parent_key is None or bs != self.block_tokens or f.get("medium") not in DEVICE_MEDIA
                or f.get("lora_id") is not None or f.get("lora_name") or any(f.get("extra_keys") or ())):
            self.skipped_blocks += len(hashes)
            return
        ids = f.get("token_ids") or []
        for i, block_hash in enumerate(hashes):
            block = ids[i * bs:(i + 1) * bs]
            if len(block) != bs:
                self.skipped_blocks += len(hashes) - i
                return
            key = hash((parent_key, tuple(block)))
            copies = self._copies.get(block_hash, 0)
            self._copies[block_hash] = copies + 1
            if not copies:
                self._key_of[block_hash] = key
                self._stored[key] = self._stored.get(key, 0) + 1
            parent_key = key


async def follow_kv_events(endpoint: str, index: KVEventIndex, topic: str = "") -> None:
    """Subscribe to an engine's KV-event publisher and apply every batch to `index` (until cancelled)."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sock.connect(endpoint)
    try:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 2:
                continue
            try:
                seq = int.from_bytes(frames[-2], "big") if len(frames) >= 3 else index.last_seq + 1
                index.apply_message(seq, frames[-1])
            except (msgspec.DecodeError, ValueError, TypeError) as exc:  # a malformed message must not end the loop
                log.warning("KV events from %s: unreadable message (%s)", endpoint, exc)
    except asyncio.CancelledError:
        raise
    finally:
        sock.close(linger=0)


__all__ = ["KVEventIndex", "follow_kv_events"]
