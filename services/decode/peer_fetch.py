"""Peer pull, the decode worker's side: it serves the cache service's Fetch over its own prefix cache, so a prefill
worker the scheduler sends here (RouteResponse.kv_peer) takes a prompt's cached leading blocks from this pool
instead of computing them. The blocks are pinned (shared, so no eviction reuses them) on the engine thread while
one transfer writes every layer of them into the requester's reserved blocks, straight out of the pool, and
unpinned on every path: finish, failure and a cancelled call. Only Fetch is served; the cache's other RPCs answer
UNIMPLEMENTED here.
"""

from __future__ import annotations

import asyncio
import logging

from kvmesh.services.common import errors, tls
from kvmesh.services.common.transfer_telemetry import report_sent
from kvmesh.transports import TransportError
from kvmesh.transports.sender import Sender
from kvmesh.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0  # a call without a deadline still gets a bounded transfer


def _pin(engine, block_hashes: list[bytes]) -> list[int]:
    """Engine thread: the pool's blocks holding the leading hashes, each with one more reference."""
    if engine.prefix_cache is None:
        return []
    allocator = engine.prefix_cache.allocator
    block_ids = allocator.lookup(block_hashes)
    allocator.share(block_ids)
    return block_ids


def _unpin(engine, block_ids: list[int]) -> None:
    """Engine thread: drop the references `_pin` took (the blocks stay cached, findable by hash)."""
    engine.prefix_cache.allocator.free(block_ids)


class PoolFetchServicer(cache_pb2_grpc.CacheServicer):
    """The cache service's Fetch, answered from this decode worker's own pool."""

    def __init__(self, engine_thread, region, layout, backends, force: str | None = None, chaos: str | None = None,
                 secure: bool = False) -> None:
        self.et, self.layout = engine_thread, layout
        self.sender = Sender(region, layout, backends=backends, force=force, chaos=chaos, observer=report_sent,
                             tls=tls.LIVE if secure else None)
        self.num_fetches = 0

    async def Fetch(self, request: cache_pb2.FetchRequest, context) -> cache_pb2.FetchResponse:
        hashes, dst = list(request.block_hashes), list(request.destination_blocks.block_ids)
        if not request.transfer_id or len(dst) != len(hashes):
            raise errors.InvalidArgumentError(f"a fetch needs a transfer_id and one destination block per hash; got "
                                              f"{len(dst)} blocks for {len(hashes)} hashes")
        if request.layout != self.layout or request.destination.layout != self.layout:
            raise errors.InvalidArgumentError("the fetch's KV layout differs from this decode worker's pool")
        if not hashes:
            return cache_pb2.FetchResponse()
        pinned = self.et.submit(_pin, self.et.engine, hashes)
        try:
            block_ids = await asyncio.shield(pinned)
            if not block_ids:
                return cache_pb2.FetchResponse()
            src = block_ids + [block_ids[-1]] * (len(hashes) - len(block_ids))  # filler the requester computes over
            stats = await self._send(request, dst, src, context.time_remaining() or DEFAULT_TIMEOUT_S)
        except TransportError as e:
            raise errors.MeshError.with_status(errors.status_for(e), f"fetch {request.transfer_id} from this decode "
                                                                     f"worker's pool failed: {e}") from None
        finally:
            pinned.add_done_callback(self._unpin)  # runs now if pinned is done, else once the engine pinned them
        self.num_fetches += 1
        return cache_pb2.FetchResponse(num_blocks=len(block_ids), num_dram_blocks=len(block_ids),
                                       backend=stats.backend, bytes=stats.bytes, seconds=stats.seconds)

    async def _send(self, request, dst: list[int], src: list[int], timeout: float):
        transfer = await self.sender.open(request.destination, request.transfer_id, dst, timeout=timeout)
        async with transfer:
            for layer in range(self.layout.num_layers):
                await transfer.send_layer(layer, src)
            return await transfer.commit()

    def _unpin(self, pinned: asyncio.Future) -> None:
        if not pinned.cancelled() and pinned.exception() is None and pinned.result():
            self.et.submit(_unpin, self.et.engine, pinned.result())

    async def close(self) -> None:
        await self.sender.close()
