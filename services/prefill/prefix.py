"""Prefix reuse on the prefill worker: import the cached leading blocks of a prompt into this worker's own
reserved blocks before the prefill, and offer the prompt's new full blocks to the cache after it.

Every step is best effort: a cache that is unreachable, a block that fails its checksum, or no free blocks to
reserve simply means more of the prompt is computed.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from kvmesh.services.cache.keys import full_block_hashes, prompt_hashes
from kvmesh.services.common import telemetry
from kvmesh.services.engine.errors import OutOfBlocksError

log = logging.getLogger(__name__)


def stack_blocks(layout, blocks: list[bytes]) -> np.ndarray:
    """Cached blocks (each K and V of every layer) as import_blocks wants them: uint8 [L, 2, k, block_nbytes]."""
    shape = (layout.num_layers, 2, layout.block_nbytes)
    return np.stack([np.frombuffer(b, dtype=np.uint8).reshape(shape) for b in blocks], axis=2)


def split_blocks(data: np.ndarray) -> list[bytes]:
    """export_blocks' [L, 2, n, block_nbytes] as n block payloads (the inverse of stack_blocks)."""
    return [data[:, :, i].tobytes() for i in range(data.shape[2])]


def _reserve_and_import(engine, request_id: str, num_tokens: int, data: np.ndarray) -> None:
    """Engine thread: reserve the prompt's blocks and write the cached prefix into the leading ones."""
    block_ids = engine.reserve(request_id, num_tokens)
    try:
        engine.kv_cache.import_blocks(block_ids[:data.shape[2]], data)
    except Exception:
        engine.release(request_id)
        raise


def _export(engine, request_id: str, first: int, end: int) -> np.ndarray:
    """Engine thread: a copy of blocks first..end-1 of a request's block table."""
    return engine.kv_cache.export_blocks(engine.block_table(request_id)[first:end])


async def import_prefix(et, cache, request_id: str, token_ids: list[int], cache_salt: str) -> int:
    """Fetch and import the cached prefix of a prompt; return the prompt tokens it covers (0: compute all)."""
    engine = et.engine
    hashes = prompt_hashes(engine.layout, token_ids, cache_salt)
    if cache is None or not hashes:
        return 0
    with telemetry.tracer().start_as_current_span("cache.lookup") as span:
        num_hits = await cache.lookup(hashes)
        span.set_attribute("kvmesh.cache.hit_blocks", num_hits)
    if not num_hits:
        return 0
    with telemetry.tracer().start_as_current_span("cache.get") as span:
        blocks = await cache.get(hashes[:num_hits])
        span.set_attribute("kvmesh.cache.hit_blocks", len(blocks))
        span.set_attribute("kvmesh.kv.bytes", sum(len(b) for b in blocks))
        if not blocks:
            return 0
        data = await asyncio.to_thread(stack_blocks, engine.layout, blocks)
        try:
            await et.call(_reserve_and_import, engine, request_id, len(token_ids), data)
        except OutOfBlocksError:
            log.info("no free blocks to import %d cached blocks of %s; computing them", len(blocks), request_id)
            return 0
    return len(blocks) * engine.layout.block_size


def offer_new_blocks(et, cache, request_id: str, token_ids: list[int], cache_salt: str,
                     num_cached_tokens: int) -> None:
    """Queue the prompt's full blocks past the cached prefix for the cache. The export is queued on the engine
    thread now, so it runs before the blocks are released; the puts happen in the background."""
    engine = et.engine
    if cache is None or not cache.can_offer():
        return
    hashes = full_block_hashes(engine.layout, token_ids, cache_salt)
    first = num_cached_tokens // engine.layout.block_size
    if first >= len(hashes):
        return
    exported = et.submit(_export, engine, request_id, first, len(hashes))

    async def payloads() -> list[bytes]:
        return await asyncio.to_thread(split_blocks, await exported)

    pending = payloads()
    if not cache.offer(hashes[first:], pending):
        pending.close()
        exported.cancel()
