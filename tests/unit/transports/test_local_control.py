"""The local control channel (local.py): the same answers as the gRPC service, robust to garbage, and it tells
the receiver when a same-host sender vanishes. The receiver is served in this process; senders and raw clients
connect to its abstract Unix socket for real."""

import asyncio
import socket
import struct

import numpy as np
import pytest

from kvmesh.transports import InvalidTransfer, PeerUnavailable, UnknownTransfer, allocate_region, make_layout
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.sender import Sender
from kvmesh.transports.local import ERROR, HEADER, KIND_OF, OK, LocalPeer
from kvmesh.v1 import kv_pb2

LAYOUT = make_layout(2, 4, 2, 8, "float32")  # 256-byte blocks


def run(body, backends=("shm",)):
    """`body(receiver)` on a loop with a served Receiver (no gRPC server: same-host senders need none)."""

    async def main():
        region = allocate_region(2, 16, 256, list(backends))
        receiver = Receiver(region, LAYOUT, address="127.0.0.1:9", backends=list(backends))
        try:
            return await body(receiver)
        finally:
            receiver.close()

    return asyncio.run(main())


async def raw(name: str):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + name)
    sock.setblocking(False)
    return await asyncio.open_unix_connection(sock=sock)


def test_descriptor_names_the_socket_and_a_same_host_transfer_uses_it():
    async def body(receiver):
        name = receiver.descriptor().control_socket
        assert name.startswith("kvmesh-ctl-")
        receiver.expect("t1", [3, 4], lease_s=10)
        src_region = allocate_region(2, 16, 256)
        src_region.array[:] = np.random.default_rng(0).integers(0, 256, src_region.array.shape, np.uint8)
        sender = Sender(src_region, LAYOUT, backends=["shm"])
        try:
            transfer = await sender.open(receiver.descriptor(), "t1", [3, 4])
            for layer in range(2):
                await transfer.send_layer(layer, [0, 1])
            await transfer.commit()
            assert isinstance(sender.control_peer(receiver.descriptor()), LocalPeer)
        finally:
            await sender.close()
        await receiver.wait("t1", 5)
        assert np.array_equal(receiver.region.array[:, :, 3:5], src_region.array[:, :, 0:2])

    run(body)


def test_errors_come_back_typed():
    async def body(receiver):
        peer = LocalPeer(receiver.descriptor().control_socket)
        try:
            with pytest.raises(UnknownTransfer, match="no live transfer"):
                await peer.open("nope", np.array([1]), LAYOUT, "shm", "h", 5)
            receiver.expect("t2", [1, 2], lease_s=10)
            with pytest.raises(InvalidTransfer, match="differ from the reserved"):
                await peer.open("t2", np.array([1, 3]), LAYOUT, "shm", "h", 5)
        finally:
            await peer.close()

    run(body)


def test_garbage_gets_invalid_argument_and_bad_frames_close_only_that_connection():
    async def body(receiver):
        name = receiver.descriptor().control_socket
        reader, writer = await raw(name)
        writer.write(HEADER.pack(3, KIND_OF["Open"], 7) + b"\xff\xff\xff")  # not an OpenRequest
        length, kind, call_id = HEADER.unpack(await reader.readexactly(HEADER.size))
        body_ = await reader.readexactly(length)
        assert (kind, call_id) == (ERROR, 7) and body_.startswith(b"INVALID_ARGUMENT\n")
        writer.write(HEADER.pack(1 << 30, KIND_OF["Open"], 8))  # absurd length: the connection is closed
        assert await reader.read() == b""
        reader2, writer2 = await raw(name)
        writer2.write(struct.pack("!IBI", 0, 99, 9))  # unknown kind: closed too
        assert await reader2.read() == b""
        for w in (writer, writer2):
            w.close()
        peer = LocalPeer(name)  # and the receiver still answers everyone else
        try:
            reply = await peer.call("Abort", kv_pb2.AbortRequest(transfer_id="x"), 5, "abort")
            assert reply.found is False
        finally:
            await peer.close()

    run(body)


def test_a_vanished_sender_fails_its_open_transfer_at_once():
    async def body(receiver):
        receiver.expect("t3", [5], lease_s=30)
        reader, writer = await raw(receiver.descriptor().control_socket)
        request = kv_pb2.OpenRequest(transfer_id="t3", dst_block_ids=[5], layout=LAYOUT, backend="shm")
        payload = request.SerializeToString()
        writer.write(HEADER.pack(len(payload), KIND_OF["Open"], 1) + payload)
        _, kind, _ = HEADER.unpack(await reader.readexactly(HEADER.size))
        assert kind == OK
        writer.close()  # as a crashed sender's kernel would
        with pytest.raises(PeerUnavailable, match="vanished"):
            await receiver.wait("t3", 5)
        await asyncio.wait_for(receiver.retire("t3"), 1)  # nothing more can be written: released at once
        assert receiver.num_transfers == 0 and receiver.num_fences == 0

    run(body)


def test_a_receiver_gone_is_peer_unavailable():
    async def body(receiver):
        peer = LocalPeer(receiver.descriptor().control_socket)
        await peer.abort("warm", "connect")
        receiver.close()
        try:
            with pytest.raises(PeerUnavailable):
                await peer.open("t4", np.array([1]), LAYOUT, "shm", "h", 2)
        finally:
            await peer.close()

    run(body)
