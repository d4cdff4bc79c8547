"""A receiver's lease measures progress, not patience: whatever of a transfer arrives renews it (and tells the
progress listener), a transfer that keeps moving outlives many lease periods, and one that stops moving, or
never starts, still lapses with TransferTimeout and leaves no record behind."""

import asyncio
import time

import grpc
import numpy as np
import pytest

from kvmesh.transports import TransferTimeout, allocate_region, make_layout
from kvmesh.transports.base import PROGRESS_LAYER
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.sender import Sender
from kvmesh.v1 import kv_pb2, kv_pb2_grpc

NUM_LAYERS = 8
LAYOUT = make_layout(NUM_LAYERS, 4, 2, 8, "float32")  # 256-byte blocks
LEASE_S = 0.6
IDS = [1, 2, 3]


async def _serve(backend: str, body):
    """Run `body(receiver, sender, heard, stub)` against a Receiver served on 127.0.0.1; `heard` collects the
    transfer ids its progress listener was told of."""
    dst = allocate_region(NUM_LAYERS, 8, 256, backend)
    src = allocate_region(NUM_LAYERS, 8, 256)
    src.array[:] = np.random.default_rng(5).integers(0, 256, src.array.shape, np.uint8)
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    heard: list[str] = []
    receiver = Receiver(dst, LAYOUT, address=f"127.0.0.1:{port}", backends=[backend], progress_listener=heard.append)
    receiver.mount(server)
    await server.start()
    channel = grpc.aio.insecure_channel(receiver.address)
    try:
        return await body(receiver, lambda chaos: Sender(src, LAYOUT, backends=[backend], chaos=chaos), heard,
                          kv_pb2_grpc.KVTransferStub(channel)), dst.array[:, :, IDS], src.array[:, :, IDS]
    finally:
        await channel.close()
        await server.stop(0)
        receiver.close()
        src.close()


async def _send(receiver, sender, gap_s: float) -> float:
    """One transfer of every layer with `gap_s` between layers (as a slow prefill would compute them), through
    `sender`; returns how long the receiver waited for it. The receiver's lease is LEASE_S."""

    async def send():
        transfer = await sender.open(receiver.descriptor(), "t", IDS, timeout=30)
        for layer in range(NUM_LAYERS):
            await asyncio.sleep(gap_s)
            await transfer.send_layer(layer, IDS)
        await transfer.commit()

    receiver.expect("t", IDS, lease_s=LEASE_S)
    started = time.monotonic()
    sending = asyncio.ensure_future(send())
    try:
        await receiver.wait("t", timeout=30)
        await sending
        return time.monotonic() - started
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await sender.close()


@pytest.mark.parametrize("backend", ["grpc", "shm"])
def test_a_slow_transfer_that_keeps_moving_outlives_its_lease(backend):
    async def body(receiver, make_sender, heard, stub):
        seconds = await _send(receiver, make_sender(None), gap_s=LEASE_S / 3)
        return seconds, receiver.num_transfers, heard

    (seconds, live, heard), landed, sent = asyncio.run(_serve(backend, body))
    assert seconds > 2 * LEASE_S  # it took several lease periods, and still landed
    assert np.array_equal(landed, sent) and live == 0
    assert len(heard) >= NUM_LAYERS // 3 and set(heard) == {"t"}  # the listener heard it move


@pytest.mark.parametrize("backend", ["grpc", "shm"])
def test_progress_through_chaos_delay_renews_the_lease(backend):
    async def body(receiver, make_sender, heard, stub):
        return await _send(receiver, make_sender(f"delay={LEASE_S / 3}s"), gap_s=0)

    seconds, landed, sent = asyncio.run(_serve(backend, body))
    assert seconds > 2 * LEASE_S and np.array_equal(landed, sent)


@pytest.mark.parametrize("backend", ["grpc", "shm"])
def test_a_transfer_that_stops_moving_lapses_and_leaves_no_record(backend):
    async def body(receiver, make_sender, heard, stub):
        with pytest.raises(TransferTimeout, match="nothing arrived"):
            await _send(receiver, make_sender("stall=after:3"), gap_s=0.05)
        return receiver.num_transfers

    live, _, _ = asyncio.run(_serve(backend, body))
    assert live == 0


def test_progress_hints_keep_a_record_alive_and_it_lapses_once_they_stop():
    async def body(receiver, make_sender, heard, stub):
        receiver.expect("t", IDS, lease_s=LEASE_S)
        for _ in range(8):  # 4 lease periods of hints naming no layer
            await stub.LayerWritten(kv_pb2.LayerWrittenRequest(transfer_id="t", layer=PROGRESS_LAYER))
            await asyncio.sleep(LEASE_S / 2)
        alive = receiver.num_transfers == 1
        quiet = time.monotonic()
        with pytest.raises(TransferTimeout):
            await receiver.wait("t", timeout=30)
        return alive, time.monotonic() - quiet, receiver.num_transfers, heard

    (alive, lapsed_after, live, heard), _, _ = asyncio.run(_serve("grpc", body))
    assert alive and live == 0 and heard == ["t"] * 8
    assert lapsed_after < LEASE_S + 5  # it lapses once nothing moves (generous: the machine may be loaded)


def test_an_idle_reservation_still_expires():
    async def body(receiver, make_sender, heard, stub):
        receiver.expect("t", IDS, lease_s=LEASE_S)
        started = time.monotonic()
        with pytest.raises(TransferTimeout, match="while expected"):
            await receiver.wait("t", timeout=30)
        return time.monotonic() - started, receiver.num_transfers, heard

    (seconds, live, heard), _, _ = asyncio.run(_serve("grpc", body))
    assert seconds >= LEASE_S * 0.9 and live == 0 and heard == []
