"""The identical suite every transport backend must pass: the receiver is a real separate process (peer.py),
the sender runs in the test process."""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
import pytest

from harness import DTYPES, NUM_BLOCKS, RemoteError, layout_for
from kvmesh.transports import (DataLossError, InvalidTransfer, LayoutMismatch, TransferTimeout, TransportError,
                               UnknownTransfer)
from kvmesh.transports.sender import Sender
from kvmesh.transports.blocks import layer_checksum
from kvmesh.transports.shm import list_segments, reclaim_stale_segments

LAYERS = 2


def scattered(n: int, seed: int) -> list[int]:
    """n distinct block ids: the first half sorted (so they form runs), the rest in random order."""
    ids = np.random.default_rng(seed).permutation(NUM_BLOCKS)[:n]
    ids[:n // 2] = np.sort(ids[:n // 2])
    return ids.tolist()


def expected_checksums(region, src: list[int]) -> list[str]:
    pool, ids = region.array, np.asarray(src)
    return [str(layer_checksum(pool[layer, kv, ids] for kv in (0, 1))) for layer in range(LAYERS)]


def make_sender(region, backend: str, dtype: str = "float32", **kw) -> Sender:
    return Sender(region, layout_for(dtype), backends=[backend], force=backend, **kw)


async def send_all(sender: Sender, peer, tid: str, src, dst, timeout: float = 10.0):
    transfer = await sender.open(peer.descriptor, tid, dst, timeout=timeout)
    for layer in range(LAYERS):
        await transfer.send_layer(layer, src)
    return await transfer.commit()


async def refused_open(sender: Sender, peer, tid: str, dst) -> None:
    """Open a transfer the receiver will refuse. grpc and small (staged) shm transfers do not wait for the
    Open's answer in `open` (`opened` does); no byte lands either way."""
    transfer = await sender.open(peer.descriptor, tid, dst)
    await transfer.opened()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_blocks", [1, 37, 10_000])
def test_round_trip_lands_every_byte(backend, dtype, num_blocks, peers, sender_region):
    peer, region = peers(backend, dtype), sender_region(dtype, seed=num_blocks)
    src, dst = scattered(num_blocks, 1), scattered(num_blocks, 2)
    tid = f"rt-{dtype}-{num_blocks}"
    peer.call("expect", tid=tid, blocks=dst, lease=20)

    async def run():
        sender = make_sender(region, backend, dtype)
        try:
            return await send_all(sender, peer, tid, src, dst)
        finally:
            await sender.close()

    stats = asyncio.run(run())
    received = peer.call("wait", tid=tid, timeout=10)["stats"]
    want = LAYERS * 2 * num_blocks * region.block_nbytes
    assert (stats.backend, stats.bytes, stats.blocks, stats.layers) == (backend, want, num_blocks, LAYERS)
    # whose link it measured, and the sender's time inside the transport (what the scheduler's link models fit)
    assert stats.peer == peer.descriptor.address and 0 < stats.busy_seconds <= stats.seconds
    assert received["bytes"] == want and received["backend"] == backend
    assert peer.call("digest", blocks=dst)["checksums"] == expected_checksums(region, src)
    assert peer.call("records")["n"] == 0


def test_32_concurrent_transfers(backend, peers, sender_region):
    peer, region = peers(backend), sender_region()
    blocks = np.random.default_rng(3).permutation(NUM_BLOCKS)[:32 * 50].reshape(32, 50).tolist()
    for i in range(32):
        peer.call("expect", tid=f"c{i}", blocks=blocks[i], lease=20)

    async def run():
        sender = make_sender(region, backend)
        try:
            return await asyncio.gather(*(send_all(sender, peer, f"c{i}", blocks[31 - i], blocks[i])
                                          for i in range(32)))
        finally:
            assert sender.num_open_transfers == 0
            await sender.close()

    assert all(s.blocks == 50 for s in asyncio.run(run()))
    for i in range(32):
        peer.call("wait", tid=f"c{i}", timeout=10)
        assert peer.call("digest", blocks=blocks[i])["checksums"] == expected_checksums(region, blocks[31 - i])
    assert peer.call("records")["n"] == 0


def test_receiver_gone_mid_transfer_fails_sender_within_deadline(backend, new_peer, sender_region):
    peer, region = new_peer(backend), sender_region()
    ids = scattered(500, 4)
    peer.call("expect", tid="gone", blocks=ids, lease=20)

    async def run():
        sender = make_sender(region, backend)
        transfer = await sender.open(peer.descriptor, "gone", ids, timeout=3)
        await transfer.send_layer(0, ids)
        peer.kill()
        started = time.monotonic()
        with pytest.raises(TransportError) as failed:
            await transfer.send_layer(1, ids)
            await transfer.commit()
        print("receiver gone:", repr(failed.value))
        assert time.monotonic() - started < 3.5
        assert (sender.num_open_transfers, sender.num_links) == (0, 0)
        await sender.close()

    asyncio.run(run())
    if peer.segment:  # the dead receiver could not unlink its segment: a restarting worker reclaims it
        assert peer.segment in reclaim_stale_segments()
    assert peer.segment not in list_segments()


def test_sender_gone_mid_transfer_fails_receiver_within_lease(backend, peers, new_peer):
    receiver, sender = peers(backend), new_peer(backend)
    ids, lease = scattered(300, 5), 2.0
    receiver.call("expect", tid="orphan", blocks=ids, lease=lease)
    with pytest.raises(RemoteError, match="PeerExited"):
        sender.call("send", descriptor=_b64(receiver),
                    tid="orphan", dst=ids, src=ids, die_after_layers=1, timeout=10)
    started = time.monotonic()
    sender.proc.wait(5)
    if sender.segment:  # the crashed sender's own pool: reclaimed by the next worker to start
        assert sender.segment in reclaim_stale_segments()
    with pytest.raises(RemoteError) as failed:
        receiver.call("wait", tid="orphan", timeout=30)
    assert failed.value.kind in ("PeerUnavailable", "TransferAborted", "TransferTimeout")
    assert time.monotonic() - started <= lease + 0.5
    assert receiver.call("records")["n"] == 0


def test_same_host_sender_gone_fails_receiver_at_once(backend, peers, new_peer):
    """On one host the control connection closing tells the receiver its sender died: no waiting for the lease,
    and `retire` (what a worker awaits before reusing the blocks) returns at once too."""
    receiver, sender = peers(backend), new_peer(backend)
    ids = scattered(300, 6)
    receiver.call("expect", tid="orphan2", blocks=ids, lease=30)
    with pytest.raises(RemoteError, match="PeerExited"):
        sender.call("send", descriptor=_b64(receiver),
                    tid="orphan2", dst=ids, src=ids, die_after_layers=1, timeout=10)
    started = time.monotonic()
    with pytest.raises(RemoteError) as failed:
        receiver.call("wait", tid="orphan2", timeout=30)
    assert failed.value.kind in ("PeerUnavailable", "TransferAborted")  # grpc: its Push stream may break first
    retired = receiver.call("retire", tid="orphan2")
    assert time.monotonic() - started < 3.0
    assert retired["fences"] == 0 and receiver.call("records")["n"] == 0
    sender.proc.wait(5)  # reaped, so its segments count as a dead owner's (a zombie still answers kill(pid, 0))
    reclaimed = reclaim_stale_segments()  # what the next worker to start does: its pool, and its staging slots
    assert not sender.segment or sender.segment in reclaimed


def test_blocks_cancelled_mid_write_are_retired_only_once_the_sender_stopped(backend, peers, sender_region):
    """A one-sided sender cannot be fenced: after the receiving worker cancels, `retire` (which it awaits before
    reusing the blocks) waits until the sender shows it stopped writing. grpc data passes through the receiver,
    which refuses it after the cancel, so there `retire` returns at once."""
    peer, region = peers(backend), sender_region()
    ids = scattered(200, 7)
    peer.call("expect", tid="fence", blocks=ids, lease=30)

    async def run():
        sender = make_sender(region, backend)
        sender.force_rendezvous = True  # a small shm transfer is staged: the sender never writes into the blocks
        try:
            transfer = await sender.open(peer.descriptor, "fence", ids, timeout=10)
            await transfer.send_layer(0, ids)
            peer.call("cancel", tid="fence")
            peer.call("retire_start", tid="fence")
            time.sleep(0.3)
            assert peer.call("retired", tid="fence")["done"] is (backend == "grpc")
            with pytest.raises(TransportError):
                await transfer.send_layer(1, ids)
                await transfer.commit()
            deadline = time.monotonic() + 2
            while not peer.call("retired", tid="fence")["done"]:
                assert time.monotonic() < deadline, "retire still waiting after the sender gave up"
                await asyncio.sleep(0.05)
            assert sender.num_open_transfers == 0
        finally:
            await sender.close()

    asyncio.run(run())
    assert peer.call("records")["n"] == 0


def test_staged_transfer_cancelled_mid_write_needs_no_fence(peers, sender_region):
    """A small shm transfer is staged in the sender's own segment, so a cancelled one leaves nothing to fence:
    `retire` returns at once, and the sender's staging slot comes back when it gives up."""
    peer, region = peers("shm"), sender_region()
    ids = scattered(20, 8)
    peer.call("expect", tid="staged-fence", blocks=ids, lease=30)

    async def run():
        sender = make_sender(region, "shm")
        try:
            transfer = await sender.open(peer.descriptor, "staged-fence", ids, timeout=10)
            assert type(transfer).__name__ == "StagedTransfer" and sender.num_staging_slots_busy == 1
            await transfer.send_layer(0, ids)
            peer.call("cancel", tid="staged-fence")
            peer.call("retire_start", tid="staged-fence")
            time.sleep(0.3)
            assert peer.call("retired", tid="staged-fence")["done"]
            await transfer.send_layer(1, ids)
            with pytest.raises(TransportError):
                await transfer.commit()
            assert sender.num_open_transfers == 0 and sender.num_staging_slots_busy == 0
        finally:
            await sender.close()

    asyncio.run(run())
    assert peer.call("records")["n"] == 0


def _b64(peer) -> str:
    return base64.b64encode(peer.descriptor.SerializeToString()).decode()


@pytest.mark.parametrize("spec", ["corrupt=1", "drop=0.5,seed=3"])
def test_damaged_bytes_are_data_loss_on_both_sides(backend, spec, peers, sender_region):
    peer, region = peers(backend), sender_region()
    ids = scattered(200, 6)
    peer.call("expect", tid=f"bad-{spec}", blocks=ids, lease=20)

    async def run():
        sender = make_sender(region, backend, chaos=spec)
        with pytest.raises(DataLossError):
            await send_all(sender, peer, f"bad-{spec}", ids, ids)
        assert sender.num_open_transfers == 0
        await sender.close()

    asyncio.run(run())
    with pytest.raises(RemoteError, match="DataLossError"):
        peer.call("wait", tid=f"bad-{spec}", timeout=5)
    assert peer.call("records")["n"] == 0


def test_stalled_sender_times_out_and_receiver_learns(backend, peers, sender_region):
    peer, region = peers(backend), sender_region()
    ids = scattered(50, 7)
    peer.call("expect", tid="stall", blocks=ids, lease=20)

    async def run():
        sender = make_sender(region, backend, chaos="stall=after:1")
        started = time.monotonic()
        with pytest.raises(TransferTimeout):
            await send_all(sender, peer, "stall", ids, ids, timeout=1.0)
        assert time.monotonic() - started < 1.5
        await sender.close()

    asyncio.run(run())
    with pytest.raises(RemoteError, match="TransferAborted"):
        peer.call("wait", tid="stall", timeout=5)


def test_contract_violations_fail_before_any_data(backend, peers, sender_region):
    peer = peers(backend)
    peer.call("expect", tid="strict", blocks=[1, 2, 3], lease=20)

    async def run():
        sender = make_sender(sender_region("float16"), backend, "float16")
        with pytest.raises(LayoutMismatch):
            await sender.open(peer.descriptor, "strict", [1, 2, 3])
        await sender.close()
        sender = make_sender(sender_region(), backend)
        with pytest.raises(UnknownTransfer):
            await refused_open(sender, peer, "never-expected", [1, 2, 3])
        with pytest.raises(InvalidTransfer):
            await refused_open(sender, peer, "strict", [1, 2, 4])
        with pytest.raises(InvalidTransfer):
            await sender.open(peer.descriptor, "strict", [NUM_BLOCKS])
        transfer = await sender.open(peer.descriptor, "strict", [1, 2, 3])
        with pytest.raises(InvalidTransfer):
            await transfer.send_layer(0, [1, 2])
        await transfer.abort()
        assert sender.num_open_transfers == 0
        await sender.close()

    asyncio.run(run())
    with pytest.raises(RemoteError, match="TransferAborted"):
        peer.call("wait", tid="strict", timeout=5)


def test_receiver_cancel_makes_commit_fail(backend, peers, sender_region):
    peer, region = peers(backend), sender_region()
    peer.call("expect", tid="cancelled", blocks=[5, 6], lease=20)

    async def run():
        sender = make_sender(region, backend)
        transfer = await sender.open(peer.descriptor, "cancelled", [5, 6], timeout=5)
        await transfer.send_layer(0, [7, 8])
        assert (await asyncio.to_thread(peer.call, "cancel", tid="cancelled"))["found"]
        with pytest.raises((UnknownTransfer, InvalidTransfer, TransportError)):
            await transfer.send_layer(1, [7, 8])
            await transfer.commit()
        assert sender.num_open_transfers == 0
        await sender.close()

    asyncio.run(run())
    assert peer.call("cancel", tid="cancelled")["found"] is False
    assert peer.call("records")["n"] == 0


def test_throttle_caps_bandwidth(backend, peers, sender_region):
    peer, region = peers(backend), sender_region()
    ids = list(range(2000, 3000))  # 1,024,000 bytes in all
    peer.call("expect", tid="slow", blocks=ids, lease=20)

    async def run():
        sender = make_sender(region, backend, chaos="throttle=10MBps")
        try:
            return await send_all(sender, peer, "slow", ids, ids)
        finally:
            await sender.close()

    stats = asyncio.run(run())
    assert stats.seconds >= 0.1 and stats.gbps <= 0.0105
    assert stats.busy_seconds >= 0.1  # a slow link shows in the sender's time inside the transport
    peer.call("wait", tid="slow", timeout=5)


def test_closing_the_sender_aborts_its_open_transfers(backend, peers, sender_region):
    peer, region = peers(backend), sender_region()
    peer.call("expect", tid="closing", blocks=[40, 41], lease=20)

    async def run():
        sender = make_sender(region, backend)
        transfer = await sender.open(peer.descriptor, "closing", [40, 41], timeout=5)
        await transfer.send_layer(0, [1, 2])
        await sender.close()
        assert sender.num_open_transfers == 0 and transfer.state == "failed"

    asyncio.run(run())
    with pytest.raises(RemoteError, match="TransferAborted"):
        peer.call("wait", tid="closing", timeout=5)
