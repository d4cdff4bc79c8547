"""The decode worker's side of peer pull: the blocks a Fetch pins in its prefix cache come back on every path — a
transfer that commits, one that fails (its status passed on), and a call cancelled mid-transfer — and a fetch of
another layout is refused. The engine thread and the transfer are stand-ins here (the e2e test moves real blocks
through every transport): what is checked is the pool's reference counts."""

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from kvmesh.services.common.errors import InvalidArgumentError, MeshError
from kvmesh.services.decode.peer_fetch import PoolFetchServicer
from kvmesh.services.engine.prefix_cache import PrefixCachingAllocator
from kvmesh.transports import TransferTimeout
from kvmesh.transports.region import make_layout
from kvmesh.v1 import cache_pb2, common_pb2

LAYOUT = make_layout(2, 16, 2, 8, "float32", "tiny")
HASHES = [bytes([i]) * 16 for i in range(3)]


class EngineThread:
    """Runs each command at once, on the loop (the real one queues it for the engine thread between steps)."""

    def __init__(self, allocator):
        self.engine = SimpleNamespace(prefix_cache=SimpleNamespace(allocator=allocator))

    def submit(self, fn, *args):
        future = asyncio.get_running_loop().create_future()
        future.set_result(fn(*args))
        return future


def pool_and_servicer(send):
    allocator = PrefixCachingAllocator(8)
    blocks = allocator.allocate(2)
    for block, h in zip(blocks, HASHES):
        allocator.cache(block, h)
    allocator.free(blocks)  # cached-free: findable, held by nobody
    servicer = PoolFetchServicer.__new__(PoolFetchServicer)
    servicer.et, servicer.layout, servicer.num_fetches = EngineThread(allocator), LAYOUT, 0
    servicer._send = send
    return allocator, blocks, servicer


def request(layout=LAYOUT):
    return cache_pb2.FetchRequest(layout=layout, block_hashes=HASHES, transfer_id="r/cache",
                                  destination=common_pb2.TransportDescriptor(layout=layout),
                                  destination_blocks=common_pb2.BlockRef(block_ids=[5, 6, 7]))


def context():
    return SimpleNamespace(time_remaining=lambda: 5.0)


async def settle():
    for _ in range(3):
        await asyncio.sleep(0)


def test_a_fetch_sends_the_held_leading_blocks_then_unpins_them():
    async def main():
        sent = {}

        async def send(req, dst, src, timeout):
            sent["src"], sent["dst"] = src, dst
            assert [allocator.refcount(b) for b in blocks] == [1, 1]  # pinned while they move
            return SimpleNamespace(backend="shm", bytes=3 * 4096, seconds=0.001)

        allocator, blocks, servicer = pool_and_servicer(send)
        reply = await servicer.Fetch(request(), context())
        await settle()
        assert reply.num_blocks == 2 and reply.backend == "shm"
        assert sent == {"src": blocks + [blocks[-1]], "dst": [5, 6, 7]}  # the third repeats the last as filler
        assert [allocator.refcount(b) for b in blocks] == [0, 0] and allocator.num_cached_free_blocks == 2

    asyncio.run(main())


def test_a_failed_or_cancelled_transfer_unpins_too():
    async def main():
        async def fail(*_):
            raise TransferTimeout("no progress for 5 s")

        allocator, blocks, servicer = pool_and_servicer(fail)
        with pytest.raises(MeshError) as failed:
            await servicer.Fetch(request(), context())
        assert failed.value.grpc_status == grpc.StatusCode.DEADLINE_EXCEEDED
        await settle()
        assert [allocator.refcount(b) for b in blocks] == [0, 0]

        started = asyncio.Event()

        async def hang(*_):
            started.set()
            await asyncio.sleep(60)

        allocator, blocks, servicer = pool_and_servicer(hang)
        call = asyncio.ensure_future(servicer.Fetch(request(), context()))
        await started.wait()
        assert [allocator.refcount(b) for b in blocks] == [1, 1]
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await settle()
        assert [allocator.refcount(b) for b in blocks] == [0, 0]

    asyncio.run(main())


def test_a_fetch_of_another_layout_is_refused():
    async def main():
        _, _, servicer = pool_and_servicer(None)
        with pytest.raises(InvalidArgumentError, match="layout differs"):
            await servicer.Fetch(request(make_layout(2, 32, 2, 8, "float32", "tiny")), context())

    asyncio.run(main())
