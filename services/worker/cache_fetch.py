"""Have the cache service deliver blocks it holds into this worker's own pool, through the KV transports."""

from __future__ import annotations

import asyncio
import logging

from kvmesh.transports import TransportError
from kvmesh.v1 import cache_pb2

log = logging.getLogger(__name__)


async def fetch_into(cache, receiver, transfer_id: str, hashes: list[bytes], block_ids: list[int]):
    """Expect the cache's transfer into block_ids, ask for it, wait for it verified; the cache's reply, or an
    empty one when anything failed. The transfer is retired on every path, so nothing writes into the blocks
    after this returns."""
    timeout = cache.fetch_timeout(len(hashes))
    receiver.expect(transfer_id, block_ids, lease_s=timeout + 1.0)
    landed = asyncio.ensure_future(receiver.wait(transfer_id, timeout=timeout))
    try:
        reply = await cache.fetch(hashes, receiver.descriptor(), block_ids, transfer_id)
        if reply.num_blocks:
            await landed  # the cache replies after our verified commit: this is immediate
            return reply
    except TransportError as e:
        log.warning("cached blocks of %s arrived damaged or not at all (a miss): %s", transfer_id, e)
    finally:
        landed.cancel()
        await asyncio.gather(landed, return_exceptions=True)
        await receiver.retire(transfer_id)
    return cache_pb2.FetchResponse()
