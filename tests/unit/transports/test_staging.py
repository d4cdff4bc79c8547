"""Staged shm transfers (staging.py): small transfers go as one Commit that carries the Open and where the sender
staged the bytes; the receiver copies and verifies them. Receiver and sender share this process's loop, talking
over the receiver's real local control socket."""

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from kvmesh.transports import (DataLossError, InvalidTransfer, TransferAborted, TransferTimeout, allocate_region,
                               make_layout)
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.sender import Sender
from kvmesh.transports.shm import staging
from kvmesh.transports.service import control
from kvmesh.transports.shm import SEGMENT_NAME, SHM_DIR, ShmTransfer, StagedMaps, StagedTransfer, staging_area
from kvmesh.v1 import kv_pb2

LAYOUT = make_layout(2, 4, 2, 8, "float32")  # 256-byte blocks


def run(body):
    async def main():
        receiver = Receiver(allocate_region(2, 64, 256, ["shm"]), LAYOUT, backends=["shm"])
        source = allocate_region(2, 64, 256, "grpc")
        source.array[:] = np.random.default_rng(1).integers(0, 256, source.array.shape, np.uint8)
        sender = Sender(source, LAYOUT, backends=["shm"])
        try:
            return await body(receiver, sender, source.array)
        finally:
            await sender.close()
            receiver.close()

    return asyncio.run(main())


async def send(sender, receiver, tid, src, dst, **kw):
    transfer = await sender.open(receiver.descriptor(), tid, dst, **kw)
    for layer in range(2):
        await transfer.send_layer(layer, src)
    return transfer


def test_staged_transfer_lands_every_byte_and_gives_its_slot_back():
    async def body(receiver, sender, pool):
        src, dst = [9, 3, 4, 5, 20], [7, 8, 30, 31, 2]
        receiver.expect("s1", dst)
        transfer = await send(sender, receiver, "s1", src, dst)
        assert isinstance(transfer, StagedTransfer) and sender.num_staging_slots_busy == 1
        await transfer.commit()
        stats = await receiver.wait("s1", 5)
        assert stats.bytes == 2 * 2 * 5 * 256 and stats.backend == "shm"
        assert np.array_equal(receiver.region.array[:, :, dst], pool[:, :, src])
        assert sender.num_staging_slots_busy == 0 and sender.num_open_transfers == 0
        assert receiver.num_transfers == 0 and receiver.num_fences == 0

    run(body)


def test_without_free_slots_a_small_transfer_uses_the_rendezvous(monkeypatch):
    monkeypatch.setattr(staging, "STAGING_SLOTS", 2)

    async def body(receiver, sender, pool):
        transfers = []
        for i in range(3):
            receiver.expect(f"r{i}", [i])
            transfers.append(await send(sender, receiver, f"r{i}", [i], [i]))
        assert [type(t) for t in transfers] == [StagedTransfer, StagedTransfer, ShmTransfer]
        for i, transfer in enumerate(transfers):
            await transfer.commit()
            await receiver.wait(f"r{i}", 5)
        assert np.array_equal(receiver.region.array[:, :, :3], pool[:, :, :3])
        assert sender.num_staging_slots_busy == 0

    run(body)


def test_bytes_changed_in_the_slot_after_staging_are_data_loss():
    async def body(receiver, sender, pool):
        receiver.expect("bad", [1, 2])
        transfer = await send(sender, receiver, "bad", [1, 2], [1, 2])
        transfer.staged[1, 0, 0, 0] ^= 0xFF  # as if something wrote into the slot before the receiver copied it
        with pytest.raises(DataLossError):
            await transfer.commit()
        with pytest.raises(DataLossError):
            await receiver.wait("bad", 5)
        assert sender.num_staging_slots_busy == 0  # the receiver answered: it no longer reads the slot

    run(body)


def test_an_unanswered_commit_quarantines_its_slot(monkeypatch):
    monkeypatch.setattr(staging, "QUARANTINE_S", 0.2)

    async def body(receiver, sender, pool):
        receiver.expect("slow", [1])
        transfer = await send(sender, receiver, "slow", [1], [1], timeout=0.3)

        async def hung(*args):
            await asyncio.sleep(10)

        receiver.on_commit = hung  # the receiver takes the Commit and never answers
        with pytest.raises(TransferTimeout):
            await transfer.commit()
        assert sender.num_staging_slots_busy == 0 and staging_area(sender).num_quarantined == 1
        await asyncio.sleep(0.25)
        assert staging_area(sender).take() is not None and not staging_area(sender).num_quarantined

    run(body)


def test_a_staged_commit_from_another_host_is_refused():
    """Over gRPC a peer could name any kvmesh segment of this host: only the local socket may carry staged bytes."""

    async def body(receiver, sender, pool):
        receiver.expect("remote", [1])
        request = kv_pb2.CommitRequest(transfer_id="remote", backend="shm", nbytes=1024,
                                       staged=kv_pb2.StagedBytes(segment=receiver.region.name, segment_bytes=1024))
        with pytest.raises(InvalidTransfer, match="local socket"):
            await control(receiver, "Commit", request)

    run(body)


def test_staged_maps_check_names_and_bounds_and_drop_dead_senders(tmp_path):
    maps = StagedMaps()
    with pytest.raises(InvalidTransfer):
        maps.view(kv_pb2.StagedBytes(segment="../etc/passwd", segment_bytes=4096), 16)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = [f"kvmesh-{int(dead.stdout)}-abc123", f"kvmesh-{os.getpid()}-def456"]
    for name in names:
        with open(os.path.join(SHM_DIR, name), "wb") as f:
            f.write(bytes(4096))
    try:
        with pytest.raises(InvalidTransfer):
            maps.view(kv_pb2.StagedBytes(segment=names[1], offset=4000, segment_bytes=4096), 200)
        assert maps.view(kv_pb2.StagedBytes(segment=names[0], segment_bytes=4096), 16).size == 16
        assert maps.view(kv_pb2.StagedBytes(segment=names[1], segment_bytes=4096), 16).size == 16
        assert list(maps._maps) == [names[1]]  # the dead sender's segment was unmapped
    finally:
        maps.close()
        for name in names:
            os.unlink(os.path.join(SHM_DIR, name))
    assert all(SEGMENT_NAME.match(n) for n in names)


def test_an_open_refused_by_the_receiver_reaches_the_sender_before_any_commit():
    async def body(receiver, sender, pool):
        transfer = await sender.open(receiver.descriptor(), "never-expected", [1])
        with pytest.raises(Exception, match="never-expected"):
            await transfer.opened()
        assert sender.num_open_transfers == 0 and sender.num_staging_slots_busy == 0

    run(body)


def test_receiver_cancel_before_the_staged_commit_needs_no_fence():
    async def body(receiver, sender, pool):
        receiver.expect("gone", [4, 5])
        transfer = await send(sender, receiver, "gone", [4, 5], [4, 5])
        await asyncio.sleep(0.05)  # the posted Open arrived: the transfer is open, but staged
        assert receiver.cancel("gone")
        await asyncio.wait_for(receiver.retire("gone"), 0.5)  # nothing of ours was written by the sender
        with pytest.raises((TransferAborted, Exception)):
            await transfer.commit()
        assert receiver.num_fences == 0 and sender.num_staging_slots_busy == 0

    run(body)


def test_a_receiver_gone_before_the_open_gives_the_slot_back():
    async def body(receiver, sender, pool):
        descriptor = receiver.descriptor()
        receiver.local.close()  # its control socket is gone: posting the Open fails at once
        with pytest.raises(Exception):
            await sender.open(descriptor, "nobody", [1])
        assert sender.num_staging_slots_busy == 0 and sender.num_open_transfers == 0

    run(body)
