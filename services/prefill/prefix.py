"""Prefix reuse on the prefill worker: have the cache deliver the cached leading blocks of a prompt into this
worker's own reserved blocks (through the KV transports, as the prefill worker itself writes into decode workers)
before the prefill, and offer the prompt's new full blocks to the cache after it.

Every step is best effort: a cache that is unreachable or slow, a transfer that fails its checksums, or no free
blocks to reserve simply means more of the prompt is computed.
"""

from __future__ import annotations

import logging

import numpy as np

from kvmesh.services import kv_identity
from kvmesh.services.clients.cache import CacheClient
from kvmesh.services.common import conventions as names
from kvmesh.services.common import telemetry
from kvmesh.services.engine.errors import OutOfBlocksError
from kvmesh.services.worker.cache_fetch import fetch_into

log = logging.getLogger(__name__)


def _export(engine, request_id: str, first: int, end: int) -> np.ndarray:
    """Engine thread: a copy of blocks first..end-1 of a request's block table."""
    return engine.export_blocks(engine.block_table(request_id)[first:end])


def prompt_chain(cache, layout, token_ids: list[int], cache_salt: str, plan_hashes) -> tuple[list[bytes], bool]:
    """The prompt's reusable-block hashes and whether they were hashed here: the plan's when they can be the
    prompt's (right count and size), else hashed here (once per request); none without a cache."""
    if cache is None:
        return [], True
    hashes = kv_identity.check_prompt_hashes(plan_hashes, len(token_ids), layout.block_size)
    if hashes:
        return hashes, False
    return kv_identity.prompt_hashes(layout, token_ids, cache_salt), True


class PeerSources:
    """Clients of decode workers' pools for peer pull, one per address (the most recent `limit` kept): a decode
    worker serves the cache service's Fetch over its own prefix cache, so the cache's client fetches from it."""

    def __init__(self, channels, layout, timeout_s: float, limit: int = 64) -> None:
        self.channels, self.layout, self.timeout_s, self.limit = channels, layout, timeout_s, limit
        self._clients: dict[str, CacheClient] = {}

    def __call__(self, address: str) -> CacheClient:
        client = self._clients.pop(address, None)
        if client is None:
            async def where() -> str:
                return address
            client = CacheClient(self.channels, where, self.layout, self.timeout_s)
        self._clients[address] = client  # most recent last
        while len(self._clients) > self.limit:
            self._clients.pop(next(iter(self._clients)))
        return client


def fetch_transfer_id(request_id: str) -> str:
    """The id under which a request's cached prefix is delivered into this worker's pool."""
    return f"{request_id}/cache"


async def import_prefix(et, cache, receiver, request_id: str, token_ids: list[int], hashes: list[bytes],
                        probed_tokens: int | None = None) -> int:
    """Have the cache deliver the cached prefix of a prompt (its reusable blocks' `hashes`) into this worker's own
    blocks; return the prompt tokens it covers (0: compute all). `probed_tokens`: what the scheduler's probe of
    the cache found, fetched without asking again (one lookup per request; a stale figure makes the fetch short);
    None: ask the cache.

    Reserves the prompt's blocks first (they stay reserved for the engine whatever happens; the caller releases
    them with the request), expects the transfer into the leading ones on this worker's `receiver`, asks the cache
    to deliver through the negotiated transport, and waits for the verified transfer. A cache that is down, slow,
    or delivers damaged bytes is a miss; the transfer is retired before the engine computes over those blocks.
    """
    engine = et.engine
    if cache is None or receiver is None or not hashes:
        return 0
    if probed_tokens is not None:
        num_hits = min(max(probed_tokens, 0) // engine.layout.block_size, len(hashes))
    else:
        with telemetry.tracer().start_as_current_span(names.CACHE_LOOKUP) as span:
            num_hits = await cache.lookup(hashes)
            span.set_attribute(names.ATTR_CACHE_HIT_BLOCKS, num_hits)
    if not num_hits:
        return 0
    with telemetry.tracer().start_as_current_span(names.CACHE_GET) as span:
        try:
            block_ids = await et.call(engine.reserve, request_id, len(token_ids))
        except OutOfBlocksError:
            log.info("no free blocks to fetch %d cached blocks of %s into; computing them", num_hits, request_id)
            return 0
        reply = await fetch_into(cache, receiver, fetch_transfer_id(request_id), hashes[:num_hits],
                             block_ids[:num_hits])
        span.set_attributes({names.ATTR_CACHE_HIT_BLOCKS: reply.num_blocks, names.ATTR_KV_BYTES: reply.bytes,
                             names.ATTR_CACHE_TIER: "ssd" if reply.num_ssd_blocks else "dram",
                             names.ATTR_KV_BACKEND: reply.backend})
    return reply.num_blocks * engine.layout.block_size


def offer_new_blocks(et, cache, request_id: str, token_ids: list[int], cache_salt: str,
                     num_cached_tokens: int, known: list[bytes] = ()) -> None:
    """Queue the prompt's full blocks past the cached prefix for the cache. The export is queued on the engine
    thread now, so it runs before the blocks are released; the puts happen in the background.

    `known`: hashes of the prompt's leading blocks this worker may chain onto: those it hashed itself, or those
    of the blocks the cache delivered (the KV computed here continues exactly those blocks). Never a peer's hash
    of a block computed here: offered under a wrong hash, the block would poison the cache for others."""
    engine = et.engine
    if cache is None or not cache.can_offer():
        return
    hashes = kv_identity.full_block_hashes(engine.layout, token_ids, cache_salt, known)
    first = num_cached_tokens // engine.layout.block_size
    if first >= len(hashes):
        return
    exported = et.submit(_export, engine, request_id, first, len(hashes))
    if not cache.offer(hashes[first:], exported):
        exported.cancel()
