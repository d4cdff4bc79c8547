"""The Cache gRPC servicer: protobuf in, a BlockStore call, protobuf out."""

from __future__ import annotations

from kvmesh.services.cache.store import BlockStore, checksum
from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2


def layout_key(layout: common_pb2.KVLayout) -> bytes:
    """The namespace of a layout's blocks: its deterministic serialization."""
    return layout.SerializeToString(deterministic=True)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def block_bytes(layout: common_pb2.KVLayout) -> int | None:
    """Bytes of one block of this layout (K and V of every layer), or None when the layout does not say."""
    itemsize = DTYPE_BYTES.get(layout.dtype)
    if itemsize is None or layout.block_size <= 0:
        return None
    return 2 * layout.num_layers * layout.block_size * layout.num_kv_heads * layout.head_dim * itemsize


class CacheServicer(cache_pb2_grpc.CacheServicer):
    """Serves kvmesh.v1.Cache over a BlockStore."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store

    async def Lookup(self, request, context):
        found = self.store.lookup(layout_key(request.layout), list(request.block_hashes))
        return cache_pb2.LookupResponse(num_cached_blocks=found)

    async def Put(self, request, context):
        expected = block_bytes(request.layout)
        if expected is not None and len(request.data) != expected:
            raise InvalidArgumentError(f"a block of this layout has {expected} bytes, got {len(request.data)}")
        stored, evicted = await self.store.put(layout_key(request.layout), request.block_hash, request.data,
                                               request.checksum)
        return cache_pb2.PutResponse(stored=stored, num_evicted=evicted)

    async def Get(self, request, context):
        for block_hash, data in self.store.get(layout_key(request.layout), list(request.block_hashes)):
            yield cache_pb2.CachedBlock(block_hash=block_hash, data=data, checksum=checksum(data))

    async def Stats(self, request, context):
        stats, tier = self.store.stats, self.store.tier
        return cache_pb2.StatsResponse(hits=stats.hits, misses=stats.misses, num_blocks=len(tier),
                                       num_bytes=tier.num_bytes, evictions=tier.num_evictions,
                                       capacity_bytes=tier.capacity_bytes, puts=stats.puts,
                                       rejected_puts=stats.rejected_puts)

    async def Clear(self, request, context):
        return cache_pb2.ClearResponse(num_blocks_removed=self.store.clear())
