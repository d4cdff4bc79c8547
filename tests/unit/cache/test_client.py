"""The cache as the prefill worker sees it: real gRPC on 127.0.0.1; an unreachable cache is a miss, not an error;
offers arrive behind the caller; pins hold blocks under pressure."""

import asyncio
import threading
import time

import numpy as np

from kvmesh.services.cache import main as cache_main
from kvmesh.services.clients.cache import CacheClient
from kvmesh.services.cache.config import CacheConfig
from kvmesh.services.cache.store import BlockStore
from kvmesh.services.cache.tiers import DramTier
from kvmesh.services.common.channels import ChannelCache
from kvmesh.services.common.server import MeshServer
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from kvmesh.services.kv_identity import checksum

LAYOUT = common_pb2.KVLayout(model_id="tiny", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2,
                             head_dim=8)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 4
HASHES = [bytes([i]) * 16 for i in range(8)]


def data(i: int) -> bytes:
    return bytes([i + 1]) * BLOCK_BYTES


def client_for(address: str, channels: ChannelCache) -> CacheClient:
    async def find() -> str:
        return address

    return CacheClient(channels, find, LAYOUT, timeout_s=1.0)


def test_an_unreachable_cache_is_a_quick_miss():
    async def body():
        channels = ChannelCache()
        client = client_for("127.0.0.1:1", channels)
        start = time.monotonic()
        assert await client.lookup(HASHES) == 0 and await client.get(HASHES) == []
        assert time.monotonic() - start < 5
        await channels.close()

    asyncio.run(body())


def test_offers_land_tail_first_and_are_fetched_back_verified_and_pins_hold():
    async def body():
        server = MeshServer(CacheConfig(port=0, dram_bytes=4 * BLOCK_BYTES, scheduler=""), "cache")
        servicer = cache_main.setup(server.config, server)
        await server.start()
        channels = ChannelCache()
        try:
            client = client_for(server.address, channels)

            async def exported():  # as the engine's export_blocks gives them: [layers, K/V, blocks, bytes]
                return np.stack([np.frombuffer(data(i), np.uint8).reshape(2, 2, -1) for i in range(4)], axis=2)

            assert client.offer(HASHES[:4], exported())
            deadline = time.monotonic() + 5
            while await client.lookup(HASHES[:4], peek=True) < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert await client.get(HASHES[:4]) == [data(i) for i in range(4)]
            stub = cache_pb2_grpc.CacheStub(channels.get(server.address))
            assert (await stub.Pin(cache_pb2.PinRequest(layout=LAYOUT, block_hashes=HASHES[:1]))).num_blocks == 1
            for i in range(4, 8):
                await stub.Put(cache_pb2.PutRequest(layout=LAYOUT, block_hash=HASHES[i], data=data(i),
                                                    checksum=checksum(data(i))))
            assert await client.lookup(HASHES[:1]) == 1  # pinned: survived four evictions
            stats = await stub.Stats(cache_pb2.StatsRequest())
            assert stats.tiers[0].name == "dram" and stats.tiers[0].num_bytes <= 4 * BLOCK_BYTES
            assert servicer.store.dram.num_evictions >= 4
            await client.close()
        finally:
            await channels.close()
            await server.stop(0)

    asyncio.run(body())


def test_the_dram_budget_holds_under_concurrent_puts_and_gets(tmp_path):
    from kvmesh.services.cache.tiers import SsdTier

    store = BlockStore(DramTier(10 * 100), SsdTier(30 * 100, tmp_path))
    blocks = {bytes([i]) * 16: bytes([i]) * 100 for i in range(60)}
    errors = []

    def worker(seed: int):
        keys = list(blocks)
        for n in range(300):
            key = keys[(seed * 7 + n * 13) % len(keys)]
            store.put_verified("L", key, blocks[key], checksum(blocks[key]))
            for h, d, _ in store.get("L", [keys[(seed + n) % len(keys)]]):
                if d != blocks[h]:
                    errors.append(h)
            if store.dram.num_bytes > store.dram.capacity_bytes or store.ssd.num_bytes > store.ssd.capacity_bytes:
                errors.append("budget")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert errors == [] and store.dram.num_evictions > 0
