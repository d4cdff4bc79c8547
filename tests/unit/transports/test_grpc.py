"""The grpc backend's chunking: long runs split across chunks, small layers coalesced, bytes exact either way."""

import asyncio

import grpc
import numpy as np
import pytest

from kvmesh.transports import allocate_region, make_layout
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.sender import Sender
from kvmesh.transports.grpc import decode_chunk
from kvmesh.v1 import kv_pb2

LAYOUT = make_layout(3, 4, 2, 8, "float32")  # 256-byte blocks


@pytest.mark.parametrize("num_blocks", [2, 100])
def test_chunking_keeps_every_byte_in_place(num_blocks):
    async def main():
        dst_region, src_region = allocate_region(3, 128, 256), allocate_region(3, 128, 256)
        src_region.array[:] = np.random.default_rng(0).integers(0, 256, src_region.array.shape, np.uint8)
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        receiver = Receiver(dst_region, LAYOUT, address=f"127.0.0.1:{port}", backends=["grpc"])
        receiver.mount(server)
        await server.start()
        sender = Sender(src_region, LAYOUT, backends=["grpc"], chunk_bytes=4096)  # 16 blocks per chunk
        src, dst = list(range(10, 10 + num_blocks)), list(range(127, 127 - num_blocks, -1))
        try:
            receiver.expect("t", dst)
            transfer = await sender.open(receiver.descriptor(), "t", dst, timeout=5)
            for layer in (2, 0, 1):  # any order
                await transfer.send_layer(layer, src)
            src_region.array[:] = 0  # after send_layer the sender may reuse its blocks (the tail was copied)
            stats = await transfer.commit()
            assert (await receiver.wait("t", 1)).bytes == stats.bytes == 3 * 2 * num_blocks * 256
            return dst_region.array[:, :, dst].copy(), src, src_region, dst_region
        finally:
            await sender.close()
            await server.stop(0)
            receiver.close()

    landed, src, src_region, _ = asyncio.run(main())
    expected = np.random.default_rng(0).integers(0, 256, src_region.array.shape, np.uint8)[:, :, src]
    assert np.array_equal(landed, expected)


def test_decode_chunk_views_the_data_without_copying():
    chunk = kv_pb2.KVChunk(transfer_id="t", dtype="float32", nbytes=3, data=b"abc",
                           spans=[kv_pb2.KVSpan(layer=1, kv=1, dst_block_start=2, num_blocks=1, nbytes=3)])
    decoded = decode_chunk(chunk.SerializeToString())
    assert isinstance(decoded.data, memoryview) and bytes(decoded.data) == b"abc"
    assert decoded.transfer_id == "t" and decoded.spans[0].layer == 1


def test_layers_sent_concurrently_land_intact():
    async def main():
        dst_region, src_region = allocate_region(3, 128, 256), allocate_region(3, 128, 256)
        src_region.array[:] = np.random.default_rng(1).integers(0, 256, src_region.array.shape, np.uint8)
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        receiver = Receiver(dst_region, LAYOUT, address=f"127.0.0.1:{port}", backends=["grpc"])
        receiver.mount(server)
        await server.start()
        sender = Sender(src_region, LAYOUT, backends=["grpc"], chunk_bytes=4096)
        try:
            receiver.expect("t", list(range(64)))
            transfer = await sender.open(receiver.descriptor(), "t", list(range(64)), timeout=5)
            await asyncio.gather(*(transfer.send_layer(layer, list(range(64, 128))) for layer in range(3)))
            await transfer.commit()
            await receiver.wait("t", 1)
            assert np.array_equal(dst_region.array[:, :, :64], src_region.array[:, :, 64:])
        finally:
            await sender.close()
            await server.stop(0)
            receiver.close()

    asyncio.run(main())
