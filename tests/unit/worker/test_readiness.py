"""A decode worker's readiness self-transfer: one block through each offered backend, byte for byte, the blocks
zeroed afterwards; a backend that cannot reach the worker stops the start, naming itself."""

import asyncio

import numpy as np
import pytest

from kvmesh.services.worker.readiness import TransportNotReady, self_transfer
from kvmesh.transports import allocate_region, make_layout
from kvmesh.transports.receiver import Receiver

LAYOUT = make_layout(2, 4, 2, 8, "float32")  # 256-byte blocks


def test_a_block_crosses_shared_memory_and_the_pool_is_left_zeroed():
    async def main():
        region = allocate_region(2, 16, 256, ["shm"])
        receiver = Receiver(region, LAYOUT, backends=["shm"])
        try:
            seconds = await self_transfer(region, LAYOUT, receiver, receiver.descriptor(), receiver.backends)
            return seconds, region.array.copy(), receiver.num_transfers
        finally:
            receiver.close()
            region.close()

    seconds, pool, live = asyncio.run(main())
    assert list(seconds) == ["shm"] and live == 0
    assert not np.any(pool)


def test_a_backend_that_cannot_reach_the_worker_stops_the_start():
    async def main():
        region = allocate_region(2, 16, 256)
        receiver = Receiver(region, LAYOUT, address="127.0.0.1:1", backends=["grpc"])  # nobody listens there
        try:
            with pytest.raises(TransportNotReady, match="grpc transport failed its self-transfer"):
                await self_transfer(region, LAYOUT, receiver, receiver.descriptor(), ["grpc"], timeout_s=5)
            return receiver.num_transfers
        finally:
            receiver.close()

    assert asyncio.run(main()) == 0
