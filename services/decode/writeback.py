"""Decoded KV to the cache service (`--cache-decode-kv`): when a request finishes, the full blocks its decode
completed (the reply, and the prompt's last partial block once the reply filled it) are offered to the cache, so
the next turn of the conversation, whose prompt repeats this one and its reply, is computed only past them — on
whichever prefill worker it lands — instead of recomputing the reply.

The prompt's own full blocks are not offered again: the prefill worker offered them after its prefill. A
finished request's blocks stay findable in the pool (prefix caching) until evicted, least recently used first,
so they are copied out on the engine thread by hash: a block evicted in between is simply not offered, and
neither is anything after it in the chain.
"""

from __future__ import annotations

import numpy as np

from kvmesh.services import kv_identity


def offer_decoded_blocks(et, cache, token_ids: list[int], first_block: int, cache_salt: str,
                         known: tuple[bytes, ...] = ()) -> bool:
    """Queue the full blocks of `token_ids` (the prompt, then every generated token) from `first_block` on for the
    cache; False when there is none, or no cache, or its offer queue is full. Returns at once; the copy runs on
    the engine thread, the puts behind the request. `known`: hashes of the leading blocks the engine computed
    (the finished output's `block_hashes`, cut to the prompt's full blocks), so the prompt is not hashed again."""
    engine = et.engine
    if cache is None or not engine.enable_prefix_caching or not cache.can_offer():
        return False
    with_kv = kv_identity.reusable_tokens(len(token_ids), engine.layout.block_size)  # the last token has no KV
    hashes = kv_identity.full_block_hashes(engine.layout, token_ids[:with_kv], cache_salt, known)
    if first_block >= len(hashes):
        return False
    exported = et.submit(_export_findable, engine, hashes, first_block)
    if not cache.offer(hashes[first_block:], exported):
        exported.cancel()
        return False
    return True


def _export_findable(engine, hashes: list[bytes], first: int) -> np.ndarray | None:
    """Engine thread: a copy of blocks first... of the leading run of `hashes` still findable in the pool."""
    block_ids = engine.lookup_blocks(hashes)
    return engine.export_blocks(block_ids[first:]) if len(block_ids) > first else None
