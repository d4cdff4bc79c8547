"""The block store: a block is visible only once verified and whole."""

import asyncio

import pytest

from kvmesh.services.cache.store import OFF_LOOP_BYTES, BlockStore
from kvmesh.services.cache.tiers import DramTier
from kvmesh.services.common.errors import ChecksumError
from kvmesh.services.kv_identity import checksum


def test_a_large_block_is_invisible_while_its_checksum_is_computed():
    async def body():
        store = BlockStore(DramTier(capacity_bytes=16 * OFF_LOOP_BYTES))
        data = bytes(range(256)) * (2 * OFF_LOOP_BYTES // 256)
        put = asyncio.create_task(store.put("L", b"h", data, checksum(data)))
        await asyncio.sleep(0)  # the put is now waiting for its checksum thread
        assert not put.done()
        assert store.lookup("L", [b"h"]).total == 0
        assert await put == (True, 0)
        assert store.lookup("L", [b"h"]).dram == 1
        assert store.get("L", [b"h"]) == [(b"h", data, "dram")]

    asyncio.run(body())


def test_a_corrupt_large_block_is_never_stored():
    async def body():
        store = BlockStore(DramTier(capacity_bytes=16 * OFF_LOOP_BYTES))
        data = bytes(2 * OFF_LOOP_BYTES)
        with pytest.raises(ChecksumError):
            await store.put("L", b"h", data, checksum(data) + 1)
        assert store.lookup("L", [b"h"]).total == 0 and store.stats.rejected_puts == 1

    asyncio.run(body())
