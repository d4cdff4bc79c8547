"""The Cache service over real gRPC on 127.0.0.1 (in process): round trips, eviction, checksums, stats."""

import asyncio

import grpc
import pytest
import xxhash

from kvmesh.services.cache import main as cache_main
from kvmesh.services.cache.config import CacheConfig
from kvmesh.services.common.server import MeshServer
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2

FP32 = common_pb2.KVLayout(model_id="tiny", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2,
                           head_dim=8)
BF16 = common_pb2.KVLayout(model_id="tiny", dtype="bfloat16", block_size=16, num_layers=2, num_kv_heads=2,
                           head_dim=8)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 4  # K and V, layers, tokens, heads, head_dim, float32


def block(i: int) -> tuple[bytes, bytes]:
    data = bytes([i % 256]) * BLOCK_BYTES
    return i.to_bytes(8, "little"), data


def put_request(i, layout=FP32, corrupt=False):
    block_hash, data = block(i)
    return cache_pb2.PutRequest(layout=layout, block_hash=block_hash, data=data,
                                checksum=xxhash.xxh3_64_intdigest(data) ^ int(corrupt))


def run_with_cache(body, dram_bytes=1 << 20):
    async def main():
        server = MeshServer(CacheConfig(port=0, dram_bytes=dram_bytes, scheduler=""), "cache")
        cache_main.setup(server.config, server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                await body(cache_pb2_grpc.CacheStub(channel))
        finally:
            await server.stop(0)

    asyncio.run(main())


async def lookup(stub, ids, layout=FP32):
    request = cache_pb2.LookupRequest(layout=layout, block_hashes=[block(i)[0] for i in ids])
    return (await stub.Lookup(request, timeout=2)).num_cached_blocks


async def get(stub, ids, layout=FP32):
    request = cache_pb2.GetRequest(layout=layout, block_hashes=[block(i)[0] for i in ids])
    return [(b.block_hash, b.data, b.checksum) async for b in stub.Get(request, timeout=2)]


def test_put_lookup_get_round_trip():
    async def body(stub):
        for i in (0, 1, 2):
            assert (await stub.Put(put_request(i), timeout=2)).stored
        assert await lookup(stub, [0, 1, 2, 3]) == 3
        assert await lookup(stub, [0, 5, 2]) == 1  # leading blocks only
        assert await lookup(stub, [0, 1], layout=BF16) == 0  # other layouts never see these blocks
        got = await get(stub, [0, 1, 7, 2])
        assert [(h, d) for h, d, _ in got] == [block(0), block(1)]
        assert all(c == xxhash.xxh3_64_intdigest(d) for _, d, c in got)

    run_with_cache(body)


def test_put_is_idempotent():
    async def body(stub):
        assert (await stub.Put(put_request(4), timeout=2)).stored is True
        assert (await stub.Put(put_request(4), timeout=2)).stored is False
        stats = await stub.Stats(cache_pb2.StatsRequest(), timeout=2)
        assert (stats.num_blocks, stats.num_bytes, stats.puts) == (1, BLOCK_BYTES, 1)

    run_with_cache(body)


def test_lru_eviction_keeps_the_dram_tier_within_budget():
    budget = 3 * BLOCK_BYTES + BLOCK_BYTES // 2

    async def body(stub):
        for i in range(3):
            await stub.Put(put_request(i), timeout=2)
        await get(stub, [0])  # block 0 is now more recent than 1 and 2
        reply = await stub.Put(put_request(3), timeout=2)
        assert reply.num_evicted == 1
        assert await lookup(stub, [1]) == 0 and await lookup(stub, [0, 3]) == 2
        for i in range(4, 20):
            await stub.Put(put_request(i), timeout=2)
            stats = await stub.Stats(cache_pb2.StatsRequest(), timeout=2)
            assert stats.num_bytes <= budget
        assert stats.num_blocks == 3 and stats.evictions == 17 and stats.capacity_bytes == budget

    run_with_cache(body, dram_bytes=budget)


def test_checksum_mismatch_is_data_loss_and_the_block_never_appears():
    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Put(put_request(9, corrupt=True), timeout=2)
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert "checksum mismatch" in caught.value.details()
        assert await lookup(stub, [9]) == 0
        stats = await stub.Stats(cache_pb2.StatsRequest(), timeout=2)
        assert (stats.rejected_puts, stats.num_blocks) == (1, 0)

    run_with_cache(body)


def test_bad_puts_are_rejected_with_their_status():
    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Put(cache_pb2.PutRequest(data=b"x", checksum=xxhash.xxh3_64_intdigest(b"x")),  # no hash
                           timeout=2)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        short = b"x" * (BLOCK_BYTES - 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # the wrong size for its layout
            await stub.Put(cache_pb2.PutRequest(layout=FP32, block_hash=b"h", data=short,
                                                checksum=xxhash.xxh3_64_intdigest(short)), timeout=2)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bytes" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Put(put_request(1), timeout=2)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run_with_cache(body, dram_bytes=BLOCK_BYTES // 2)


def test_stats_count_hits_misses_and_clear_empties():
    async def body(stub):
        for i in (0, 1):
            await stub.Put(put_request(i), timeout=2)
        await lookup(stub, [0, 1, 2, 3])  # 2 hits, 2 misses
        await lookup(stub, [5])  # 1 miss
        stats = await stub.Stats(cache_pb2.StatsRequest(), timeout=2)
        assert (stats.hits, stats.misses, stats.num_blocks, stats.num_bytes) == (2, 3, 2, 2 * BLOCK_BYTES)
        assert (await stub.Clear(cache_pb2.ClearRequest(), timeout=2)).num_blocks_removed == 2
        stats = await stub.Stats(cache_pb2.StatsRequest(), timeout=2)
        assert (stats.num_blocks, stats.num_bytes, stats.hits) == (0, 0, 2)
        assert await lookup(stub, [0]) == 0

    run_with_cache(body)
