"""The Cache gRPC servicer: protobuf in, a BlockStore call, protobuf out; spans and metrics once, here."""

from __future__ import annotations

import asyncio

from kvmesh.services.cache.delivery import Delivery, layout_key
from kvmesh.services.cache.store import BlockStore
from kvmesh.services.common import conventions as names
from kvmesh.services.common import metrics, telemetry
from kvmesh.services.common.channels import call_timeout
from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.services.kv_identity import block_payload_bytes, checksum
from kvmesh.v1 import cache_pb2, cache_pb2_grpc

__all__ = ["CacheServicer", "layout_key"]
FETCH_TIMEOUT_S = 30.0  # a Fetch whose caller set no deadline

class CacheServicer(cache_pb2_grpc.CacheServicer):
    """Serves kvmesh.v1.Cache over a BlockStore."""

    def __init__(self, store: BlockStore, delivery: Delivery | None = None) -> None:
        self.store = store
        self.delivery = delivery or Delivery(store, staging_blocks=1024)

    def _observe_bytes(self) -> None:
        for tier in self.store.tiers:
            metrics.CACHE_BYTES.labels(tier=tier.name).set(tier.num_bytes)

    async def Lookup(self, request, context):
        with telemetry.tracer().start_as_current_span("cache.lookup") as span:
            found = self.store.lookup(layout_key(request.layout), list(request.block_hashes), request.peek)
            span.set_attribute("kvmesh.cache.hit_blocks", found.total)
            span.set_attribute("kvmesh.cache.tier", "ssd" if found.ssd else "dram")
        if request.peek:
            return cache_pb2.LookupResponse(num_cached_blocks=found.total, num_dram_blocks=found.dram,
                                            num_ssd_blocks=found.ssd)
        for tier, n in (("dram", found.dram), ("ssd", found.ssd)):
            if n:
                metrics.CACHE_HITS.labels(tier=tier).inc(n)
        if len(request.block_hashes) > found.total:
            metrics.CACHE_MISSES.inc(len(request.block_hashes) - found.total)
        return cache_pb2.LookupResponse(num_cached_blocks=found.total, num_dram_blocks=found.dram,
                                        num_ssd_blocks=found.ssd)

    async def Put(self, request, context):
        expected = block_payload_bytes(request.layout)
        if expected is not None and len(request.data) != expected:
            raise InvalidArgumentError(f"a block of this layout has {expected} bytes, got {len(request.data)}")
        with telemetry.tracer().start_as_current_span("cache.put") as span:
            span.set_attribute("kvmesh.kv.bytes", len(request.data))
            span.set_attribute("kvmesh.cache.tier", "dram")
            stored, evicted = await self.store.put(layout_key(request.layout), request.block_hash, request.data,
                                                   request.checksum)
        self._observe_bytes()
        return cache_pb2.PutResponse(stored=stored, num_evicted=evicted)

    async def Get(self, request, context):
        with telemetry.tracer().start_as_current_span("cache.get") as span:
            blocks = await asyncio.to_thread(self.store.get, layout_key(request.layout), list(request.block_hashes))
            span.set_attribute("kvmesh.cache.hit_blocks", len(blocks))
            span.set_attribute("kvmesh.cache.tier", "ssd" if any(t == "ssd" for _, _, t in blocks) else "dram")
            span.set_attribute("kvmesh.kv.bytes", sum(len(d) for _, d, _ in blocks))
        for block_hash, data, tier in blocks:
            yield cache_pb2.CachedBlock(block_hash=block_hash, data=data, checksum=checksum(data), tier=tier)

    async def Fetch(self, request, context):
        with telemetry.tracer().start_as_current_span(names.CACHE_GET) as span:
            done = await self.delivery.deliver(request.layout, list(request.block_hashes), request.destination,
                                               list(request.destination_blocks.block_ids), request.transfer_id,
                                               call_timeout(context, FETCH_TIMEOUT_S))
            stats = done.stats
            span.set_attributes({names.ATTR_CACHE_HIT_BLOCKS: done.num_blocks,
                                 names.ATTR_CACHE_TIER: "ssd" if done.num_ssd_blocks else "dram",
                                 names.ATTR_KV_BYTES: stats.bytes if stats else 0,
                                 names.ATTR_KV_BACKEND: stats.backend if stats else ""})
        if stats is None:
            return cache_pb2.FetchResponse()
        return cache_pb2.FetchResponse(num_blocks=done.num_blocks, num_dram_blocks=done.num_dram_blocks,
                                       num_ssd_blocks=done.num_ssd_blocks, backend=stats.backend,
                                       bytes=stats.bytes, seconds=stats.seconds)

    async def Stats(self, request, context):
        stats, dram, delivery = self.store.stats, self.store.dram, self.delivery
        tiers = [cache_pb2.TierStats(name=t.name, num_blocks=len(t), num_bytes=t.num_bytes,
                                     capacity_bytes=t.capacity_bytes, hits=stats.hits[t.name],
                                     evictions=t.num_evictions) for t in self.store.tiers]
        self._observe_bytes()
        return cache_pb2.StatsResponse(hits=sum(stats.hits.values()), misses=stats.misses, num_blocks=len(dram),
                                       num_bytes=dram.num_bytes, evictions=dram.num_evictions,
                                       capacity_bytes=dram.capacity_bytes, puts=stats.puts,
                                       rejected_puts=stats.rejected_puts, tiers=tiers,
                                       corrupt_blocks=stats.corrupt_blocks, dropped_writes=stats.dropped_writes,
                                       staging_blocks_used=delivery.num_staging_used,
                                       staging_blocks_total=delivery.num_staging_total,
                                       open_transfers=delivery.num_open_transfers,
                                       deliveries=delivery.num_deliveries, failed_deliveries=delivery.num_failed,
                                       staging_waits_exhausted=delivery.num_waits_exhausted,
                                       staging_blocks_staged=delivery.num_staging_staged,
                                       staging_blocks_shared=delivery.num_staging_shared)

    async def Clear(self, request, context):
        removed = self.store.clear()
        self._observe_bytes()
        return cache_pb2.ClearResponse(num_blocks_removed=removed)

    async def Pin(self, request, context):
        return cache_pb2.PinResponse(num_blocks=self.store.pin(layout_key(request.layout),
                                                               list(request.block_hashes)))

    async def Unpin(self, request, context):
        return cache_pb2.PinResponse(num_blocks=self.store.unpin(layout_key(request.layout),
                                                                 list(request.block_hashes)))
