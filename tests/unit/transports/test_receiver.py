"""The receiver's transfer records: leases, cancel, wait timeouts, and per-chunk checksums on Push."""

import asyncio
import time

import grpc
import pytest
import xxhash

from kvmesh.transports import (DataLossError, InvalidTransfer, TransferAborted, TransferTimeout, UnknownTransfer,
                               allocate_region, make_layout)
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.errors import from_status
from kvmesh.v1 import kv_pb2, kv_pb2_grpc

LAYOUT = make_layout(2, 4, 2, 8, "float32")  # 256-byte blocks


def with_receiver(body):
    """Run `body(receiver, stub)` against a Receiver served on 127.0.0.1."""

    async def main():
        region = allocate_region(2, 16, 256)
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        receiver = Receiver(region, LAYOUT, address=f"127.0.0.1:{port}", backends=["grpc"])
        receiver.mount(server)
        await server.start()
        channel = grpc.aio.insecure_channel(receiver.address)
        try:
            return await body(receiver, kv_pb2_grpc.KVTransferStub(channel))
        finally:
            await channel.close()
            await server.stop(0)
            receiver.close()

    return asyncio.run(main())


def test_lease_lapse_fails_the_waiter_and_drops_the_record():
    async def body(receiver, stub):
        receiver.expect("t", [1, 2], lease_s=0.2)
        started = time.monotonic()
        with pytest.raises(TransferTimeout):
            await receiver.wait("t", timeout=5)
        assert time.monotonic() - started < 0.5 and receiver.num_transfers == 0

    with_receiver(body)


def test_cancel_is_idempotent_and_a_late_wait_gets_the_real_error():
    async def body(receiver, stub):
        receiver.expect("t", [1, 2])
        assert receiver.cancel("t") is True
        assert receiver.cancel("t") is False
        with pytest.raises(TransferAborted):
            await receiver.wait("t")
        with pytest.raises(UnknownTransfer):
            await receiver.wait("t")

    with_receiver(body)


def test_wait_timeout_cancels_the_transfer():
    async def body(receiver, stub):
        receiver.expect("t", [1])
        with pytest.raises(TransferTimeout):
            await receiver.wait("t", timeout=0.05)
        assert receiver.num_transfers == 0

    with_receiver(body)


@pytest.mark.parametrize("args", [([1, 1], {}), ([99], {}), ([1], {"num_layers": 3}), ([1], {"lease_s": 0})])
def test_bad_expectations_are_rejected(args):
    async def body(receiver, stub):
        with pytest.raises(InvalidTransfer):
            receiver.expect("t", args[0], **args[1])
        receiver.expect("dup", [1])
        with pytest.raises(InvalidTransfer):
            receiver.expect("dup", [2])

    with_receiver(body)


def chunk(data: bytes, checksum: int, block: int = 3) -> kv_pb2.KVChunk:
    span = kv_pb2.KVSpan(layer=0, kv=0, dst_block_start=block, num_blocks=1, offset=0, nbytes=len(data))
    return kv_pb2.KVChunk(transfer_id="t", dtype="float32", spans=[span], nbytes=len(data),
                          checksum=checksum, has_checksum=True, data=data)


def test_a_chunk_with_a_bad_checksum_is_data_loss_and_never_lands():
    async def body(receiver, stub):
        receiver.expect("t", [3])
        await stub.Open(kv_pb2.OpenRequest(transfer_id="t", dst_block_ids=[3], layout=LAYOUT, backend="grpc"))
        data = bytes(range(256))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Push(iter([chunk(data, xxhash.xxh3_64_intdigest(data) ^ 1)]))
        assert failed.value.code() == grpc.StatusCode.DATA_LOSS
        with pytest.raises(DataLossError):
            await receiver.wait("t")
        assert not receiver.region.array[0, 0, 3].any()

    with_receiver(body)


def test_a_chunk_outside_the_reserved_blocks_is_refused():
    async def body(receiver, stub):
        receiver.expect("t", [3])
        await stub.Open(kv_pb2.OpenRequest(transfer_id="t", dst_block_ids=[3], layout=LAYOUT, backend="grpc"))
        data = bytes(256)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Push(iter([chunk(data, xxhash.xxh3_64_intdigest(data), block=4)]))
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not receiver.region.array[:, :, 4].any()

    with_receiver(body)


def test_statuses_map_back_to_typed_errors():
    assert isinstance(from_status("DATA_LOSS", "x"), DataLossError)
    assert isinstance(from_status("DEADLINE_EXCEEDED", "x"), TransferTimeout)
    assert isinstance(from_status("NOT_FOUND", "x"), UnknownTransfer)
    assert DataLossError.status == "DATA_LOSS" and InvalidTransfer.status == "INVALID_ARGUMENT"
