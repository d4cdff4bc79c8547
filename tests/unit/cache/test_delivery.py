"""Fetch's transport side in one process: a store's blocks land in a receiver's reserved blocks through shm and
grpc, verified; concurrent and later deliveries of a chain share its staged copy; partial chains, damaged
transfers, full staging and cancellation leave no staging block, transfer record or shared-memory segment
behind."""

import asyncio
import os

import grpc
import numpy as np
import pytest
import xxhash

from kvmesh.services.cache.delivery import Delivery, layout_key
from kvmesh.services.cache.staging import StagedBlocks
from kvmesh.services.cache.store import BlockStore
from kvmesh.services.cache.tiers import DramTier
from kvmesh.transports import DataLossError, TransferAborted, allocate_region, block_nbytes, make_layout
from kvmesh.transports.receiver import Receiver
from kvmesh.transports import backend_class
from kvmesh.transports.shm import list_segments

LAYOUT = make_layout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32", model_id="tiny")
LAYER_BYTES = block_nbytes(LAYOUT)
BLOCK_BYTES = LAYOUT.num_layers * 2 * LAYER_BYTES
NUM_BLOCKS = 16


def block(i: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(i)
    return i.to_bytes(8, "little"), rng.integers(0, 256, BLOCK_BYTES, dtype=np.uint8).tobytes()


def store_with(ids) -> BlockStore:
    store = BlockStore(DramTier(1 << 20))
    for i in ids:
        h, data = block(i)
        store.put_verified(layout_key(LAYOUT), h, data, xxhash.xxh3_64_intdigest(data))
    return store


def landed(receiver: Receiver, block_id: int) -> bytes:
    return receiver.region.array[:, :, block_id].tobytes()


def run(backend: str, body, **delivery_args):
    """body(receiver, make_delivery) with a receiver of `backend` mounted on a grpc.aio server."""
    async def main():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        region = allocate_region(LAYOUT.num_layers, NUM_BLOCKS, LAYER_BYTES, [backend])
        receiver = Receiver(region, LAYOUT, address=f"127.0.0.1:{port}", backends=[backend])
        receiver.mount(server)
        await server.start()
        deliveries = []

        def make(store, **extra):
            deliveries.append(Delivery(store, **{"staging_blocks": 8, "backends": [backend], **delivery_args,
                                                 **extra}))
            return deliveries[-1]
        try:
            await body(receiver, make)
        finally:
            for d in deliveries:
                await d.close()
            receiver.close()
            await server.stop(0)

    asyncio.run(main())


def no_leaks(delivery: Delivery, receiver: Receiver) -> bool:
    return (delivery.num_staging_used, delivery.num_open_transfers, receiver.num_transfers,
            receiver.num_fences) == (0, 0, 0, 0)


def backends():
    for name in ("shm", "ucx", "grpc"):
        reason = backend_class(name).unavailable_reason()
        yield pytest.param(name, marks=pytest.mark.skip(reason=reason) if reason else ())


@pytest.mark.parametrize("backend", list(backends()))
def test_held_blocks_land_in_the_receivers_reserved_blocks(backend):
    async def body(receiver, make):
        delivery = make(store_with([0, 1, 2]))
        hashes, dst = [block(i)[0] for i in (0, 1, 2)], [9, 3, 4]
        receiver.expect("t1", dst)
        waiting = asyncio.ensure_future(receiver.wait("t1", timeout=10))
        done = await delivery.deliver(LAYOUT, hashes, receiver.descriptor(), dst, "t1", timeout=10)
        stats = await waiting
        assert (done.num_blocks, done.num_dram_blocks, done.stats.backend) == (3, 3, backend)
        assert stats.bytes == 3 * BLOCK_BYTES == done.stats.bytes
        assert [landed(receiver, b) for b in dst] == [block(i)[1] for i in (0, 1, 2)]
        assert no_leaks(delivery, receiver) and delivery.num_deliveries == 1

    run(backend, body)


@pytest.mark.parametrize("backend", ["shm", "grpc"])
def test_a_chain_held_in_part_delivers_its_leading_blocks_and_fills_the_rest(backend):
    async def body(receiver, make):
        delivery = make(store_with([0, 1, 3]))  # block 2 is missing: 3 is unreachable
        hashes, dst = [block(i)[0] for i in range(4)], [1, 2, 3, 4]
        receiver.expect("t2", dst)
        waiting = asyncio.ensure_future(receiver.wait("t2", timeout=10))
        done = await delivery.deliver(LAYOUT, hashes, receiver.descriptor(), dst, "t2", timeout=10)
        await waiting
        assert done.num_blocks == 2
        assert [landed(receiver, b) for b in (1, 2)] == [block(0)[1], block(1)[1]]
        assert no_leaks(delivery, receiver)

    run(backend, body)


def test_nothing_held_sends_nothing_and_the_requester_cancels():
    async def body(receiver, make):
        delivery = make(store_with([]))
        receiver.expect("t3", [0])
        done = await delivery.deliver(LAYOUT, [block(0)[0]], receiver.descriptor(), [0], "t3", timeout=5)
        assert done.num_blocks == 0 and done.stats is None
        await receiver.retire("t3")
        assert no_leaks(delivery, receiver)

    run("shm", body)


@pytest.mark.parametrize("backend", ["shm", "grpc"])
def test_a_corrupted_delivery_is_data_loss_on_both_sides_and_frees_everything(backend):
    async def body(receiver, make):
        delivery = make(store_with([0, 1]), chaos="corrupt=1")
        dst = [5, 6]
        receiver.expect("t4", dst)
        waiting = asyncio.ensure_future(receiver.wait("t4", timeout=10))
        with pytest.raises(DataLossError):
            await delivery.deliver(LAYOUT, [block(0)[0], block(1)[0]], receiver.descriptor(), dst, "t4", timeout=10)
        with pytest.raises(DataLossError):
            await waiting
        await receiver.retire("t4")
        assert no_leaks(delivery, receiver) and delivery.num_failed == 1

    run(backend, body)


def test_a_delivery_cancelled_mid_transfer_returns_its_staging_blocks_and_aborts():
    async def body(receiver, make):
        delivery = make(store_with([0, 1]), chaos="stall=after:1")
        dst = [7, 8]
        receiver.expect("t5", dst, lease_s=30)
        waiting = asyncio.ensure_future(receiver.wait("t5", timeout=30))
        task = asyncio.ensure_future(
            delivery.deliver(LAYOUT, [block(0)[0], block(1)[0]], receiver.descriptor(), dst, "t5", timeout=30))
        while not delivery.num_open_transfers:
            await asyncio.sleep(0.01)
        assert delivery.num_staging_used == 2
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        with pytest.raises(TransferAborted):
            await asyncio.wait_for(waiting, 5)
        await asyncio.wait_for(receiver.retire("t5"), 2)  # the sender's abort lifted the fence
        assert no_leaks(delivery, receiver) and delivery.num_failed == 1

    run("shm", body)


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_staging_is_bounded_waits_briefly_and_never_deadlocks():
    async def body():
        pool = StagedBlocks(4)
        held, fresh = await pool.acquire([h(i) for i in range(10)], 0)  # more than the region: capped
        assert sorted(e.block for e in held) == [0, 1, 2, 3] and fresh == held and pool.num_used == 4
        assert await pool.acquire([h(10)], 0.02) == ([], [])  # full: gives up
        later = asyncio.ensure_future(pool.acquire([h(10), h(11)], 5))
        await asyncio.sleep(0.01)
        pool.fill(fresh, [])  # the copy found nothing: nothing stays staged
        pool.release(held)
        entries, _ = await later
        assert len(entries) == 2 and pool.num_used == 2 and pool.num_staged == 2

    asyncio.run(body())


def test_staged_blocks_are_shared_kept_when_idle_and_evicted_lru_for_new_hashes():
    async def body():
        pool = StagedBlocks(3)
        a, fresh_a = await pool.acquire([h(0), h(1)], 0)
        b, fresh_b = await pool.acquire([h(0), h(1), h(2)], 0)  # shares 0 and 1 while a is still filling them
        assert fresh_a == a and fresh_b == [b[2]] and b[:2] == a and pool.num_used == 3 and pool.num_shared == 2
        pool.fill(fresh_a, ["dram", "ssd"])
        pool.fill(fresh_b, [])  # 2 was not in the store after all: unstaged at once
        assert [e.tier for e in b] == ["dram", "ssd", None]
        pool.release(a)
        pool.release(b)
        assert (pool.num_used, pool.num_staged) == (0, 2)  # 0 and 1 stay staged, idle; 2's block is free
        c, fresh_c = await pool.acquire([h(1)], 0)
        assert fresh_c == [] and c[0].tier == "ssd"  # served from staging: no copy
        pool.release(c)  # idle order now: 0, then 1
        d, fresh_d = await pool.acquire([h(5), h(6)], 0)  # 2's used block, then the least recent idle one: 0
        assert len(fresh_d) == 2 and pool.num_staged == 3
        e, fresh_e = await pool.acquire([h(0), h(1)], 0.02)  # 1 still staged; 0 was evicted, and no room is left
        assert (e, fresh_e) == ([], [])
        pool.fill(fresh_d, ["dram", "dram"])
        pool.release(d)
        e, fresh_e = await pool.acquire([h(0), h(1)], 0)
        assert [x.block_hash for x in fresh_e] == [h(0)] and e[1].tier == "ssd"
        pool.fill(fresh_e, ["dram"])
        pool.release(e)
        assert pool.num_used == 0

    asyncio.run(body())


def test_idle_staged_blocks_give_way_before_unused_memory_is_touched():
    async def body():
        pool = StagedBlocks(8)
        a, fresh = await pool.acquire([h(0), h(1)], 0)
        pool.fill(fresh, ["dram", "dram"])
        pool.release(a)
        for i in range(2, 6):  # one at a time: each new hash takes an idle block's place
            b, fresh = await pool.acquire([h(i)], 0)
            assert [e.block for e in b] == [fresh[0].block] and fresh[0].block in (0, 1)
            pool.fill(fresh, ["dram"])
            pool.release(b)
        both, _ = await pool.acquire([h(6), h(7), h(8)], 0)  # three at once: a third block is touched
        assert sorted(e.block for e in both) == [0, 1, 2]
        pool.fill(both, [])
        pool.release(both)

    asyncio.run(body())


@pytest.mark.parametrize("backend", ["shm", "grpc"])
def test_concurrent_and_later_deliveries_of_a_chain_share_one_staged_copy(backend):
    async def body(receiver, make):
        store = store_with([0, 1, 2])
        reads = []
        get = store.get
        store.get = lambda key, hashes, sink: reads.append(len(hashes)) or get(key, hashes, sink)
        delivery = make(store)
        hashes = [block(i)[0] for i in range(3)]
        dsts = {"c1": [0, 1, 2], "c2": [3, 4, 5], "c3": [6, 7, 8]}
        for tid, dst in dsts.items():
            receiver.expect(tid, dst)
        waiting = [asyncio.ensure_future(receiver.wait(t, timeout=10)) for t in dsts]
        done = await asyncio.gather(*(delivery.deliver(LAYOUT, hashes, receiver.descriptor(), dsts[t], t, timeout=10)
                                      for t in ("c1", "c2")))
        assert [d.num_blocks for d in done] == [3, 3] and reads == [3]  # copied out of the store once
        later = await delivery.deliver(LAYOUT, hashes, receiver.descriptor(), dsts["c3"], "c3", timeout=10)
        assert later.num_blocks == 3 and reads == [3]  # still staged: not read again
        await asyncio.gather(*waiting)
        for dst in dsts.values():
            assert [landed(receiver, b) for b in dst] == [block(i)[1] for i in range(3)]
        lane = delivery._lanes[layout_key(LAYOUT)]
        assert lane.staging.num_staged == 3 and lane.staging.num_shared == 6
        assert no_leaks(delivery, receiver)

    run(backend, body)


def test_staging_full_delivers_nothing_within_the_wait():
    async def body(receiver, make):
        delivery = make(store_with([0]), staging_blocks=1, wait_s=0.02)
        held, _ = await delivery._lane(layout_key(LAYOUT), LAYOUT).staging.acquire([h(99)], 0)  # another's
        receiver.expect("t6", [0])
        done = await delivery.deliver(LAYOUT, [block(0)[0]], receiver.descriptor(), [0], "t6", timeout=5)
        assert done.num_blocks == 0 and delivery.num_waits_exhausted == 1
        delivery._lanes[layout_key(LAYOUT)].staging.release(held)
        await receiver.retire("t6")
        assert no_leaks(delivery, receiver)

    run("shm", body)


def own_segments() -> list[str]:
    return [n for n in list_segments() if n.startswith(f"kvmesh-{os.getpid()}-")]


@pytest.mark.parametrize("backend", ["shm", "grpc"])
def test_no_shared_memory_segment_outlives_a_delivery(backend):
    seen = []

    async def body(receiver, make):
        delivery = make(store_with([0]))
        receiver.expect("t7", [2])
        waiting = asyncio.ensure_future(receiver.wait("t7", timeout=10))
        await delivery.deliver(LAYOUT, [block(0)[0]], receiver.descriptor(), [2], "t7", timeout=10)
        await waiting
        seen.extend(own_segments())

    run(backend, body)
    # shm: the receiver's pool, and the staging slots the cache's Sender stages small transfers in (made once per
    # Sender, not per delivery); the cache's own staging region is private memory
    assert len(seen) == 2 * (backend == "shm")
    assert own_segments() == []
