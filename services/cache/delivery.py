"""Fetch: deliver held blocks into a requester's reserved blocks through the KV transports.

The cache is a transport sender like a prefill worker. Per KV layout it keeps one lane: a staging region shaped
like that layout's pool (`staging_blocks` blocks, allocated on first use and reused) and a `Sender` over it. One
delivery:

1. peeks at how many leading blocks of the chain are held and takes that many staging blocks (at most the whole
   region); when too few are free it waits up to `wait_s`, then delivers nothing (a miss). A delivery takes all
   its staging blocks at once and never waits while holding some, so deliveries cannot deadlock;
2. copies the blocks into its staging blocks while the store's read lease holds them (off the event loop);
3. opens one transfer into the requester's destination blocks (negotiated as for the prefill→decode handoff: shm
   on one host, else ucx or grpc), sends every layer and commits; the requester verifies every layer's checksum.

A chain can be delivered only in part (a block evicted since the requester's lookup, or more blocks than staging
holds): the transfer must still cover every block the requester expected, so the blocks past the delivered ones
repeat the last delivered block (filler the requester computes over), and the reply says how many lead. Staging
blocks go back on every path: finish, error and cancel (after a copy still running in its thread is done).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvmesh.services.cache.store import BlockStore
from kvmesh.services.common.errors import CapacityError, InvalidArgumentError
from kvmesh.transports import PREFERENCE, KVRegion, Sender, TransferStats, allocate_region, block_nbytes
from kvmesh.v1 import common_pb2

log = logging.getLogger(__name__)

MAX_LAYOUTS = 16  # lanes (staging regions) one cache keeps; each is allocated once


def layout_key(layout: common_pb2.KVLayout) -> bytes:
    """The namespace of a layout's blocks: its deterministic serialization."""
    return layout.SerializeToString(deterministic=True)


@dataclass(frozen=True)
class Delivered:
    """What one Fetch delivered: leading blocks (by tier) and the transfer's figures (None: nothing sent)."""

    num_blocks: int = 0
    num_dram_blocks: int = 0
    num_ssd_blocks: int = 0
    stats: TransferStats | None = None


class StagingPool:
    """The free blocks of one staging region. `acquire` takes n at once or none; `release` gives them back."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._waiters: list[asyncio.Future] = []

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    async def acquire(self, n: int, wait_s: float) -> list[int]:
        """min(n, num_blocks) blocks, waiting up to wait_s for them to be free; [] when they were not."""
        n = min(n, self.num_blocks)
        deadline = time.monotonic() + wait_s
        while len(self._free) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except asyncio.TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return [self._free.pop() for _ in range(n)]

    def release(self, block_ids: Sequence[int]) -> None:
        """Give blocks back and wake every waiter to look again. Never awaits (safe in a cancelled task)."""
        self._free.extend(reversed(block_ids))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


@dataclass
class _Lane:
    """One layout's staging region, its free blocks, and the sender that writes out of it."""

    region: KVRegion
    staging: StagingPool
    sender: Sender


class Delivery:
    """Delivers a store's blocks into requesters' reserved blocks through the transports (see the module doc)."""

    def __init__(self, store: BlockStore, staging_blocks: int, wait_s: float = 0.5,
                 backends: Sequence[str] = PREFERENCE, force: str | None = None, chaos: str | None = None) -> None:
        self.store, self.staging_blocks, self.wait_s = store, staging_blocks, wait_s
        self.backends, self.force, self.chaos = list(backends), force, chaos
        self._lanes: dict[bytes, _Lane] = {}
        self.num_deliveries = self.num_failed = self.num_waits_exhausted = 0

    # ---- counters, for Stats and the leak checks ----

    @property
    def num_staging_used(self) -> int:
        return sum(lane.staging.num_used for lane in self._lanes.values())

    @property
    def num_staging_total(self) -> int:
        return sum(lane.staging.num_blocks for lane in self._lanes.values())

    @property
    def num_open_transfers(self) -> int:
        return sum(lane.sender.num_open_transfers for lane in self._lanes.values())

    # ---- the operation ----

    async def deliver(self, layout: common_pb2.KVLayout, block_hashes: Sequence[bytes],
                      destination: common_pb2.TransportDescriptor, dst_block_ids: Sequence[int], transfer_id: str,
                      timeout: float) -> Delivered:
        """Deliver the leading held blocks of the chain into dst_block_ids (one per hash) as transfer_id.

        Returns once the requester verified the transfer, or with nothing delivered when no block is held or no
        staging space freed up in time (the requester then cancels the transfer it expected). Raises
        InvalidArgumentError for a malformed request and the transports' errors (DataLossError, TransferTimeout,
        PeerUnavailable, ...) when the transfer fails.
        """
        self._check(layout, block_hashes, destination, dst_block_ids, transfer_id)
        key = layout_key(layout)
        held = self.store.lookup(key, block_hashes, peek=True).total
        if not held:
            return Delivered()
        lane = self._lane(key, layout)
        ids = await lane.staging.acquire(held, self.wait_s)
        if not ids:
            self.num_waits_exhausted += 1
            log.info("staging of %d blocks full for %.3f s: %s gets nothing", lane.staging.num_blocks,
                     self.wait_s, transfer_id)
            return Delivered()
        copy = asyncio.ensure_future(asyncio.to_thread(self._copy_in, lane, key, block_hashes[:len(ids)], ids))
        try:
            tiers = await asyncio.shield(copy)
            if not tiers:
                return Delivered()
            src = ids[:len(tiers)] + [ids[len(tiers) - 1]] * (len(block_hashes) - len(tiers))
            stats = await self._send(lane, destination, transfer_id, dst_block_ids, src, timeout)
        except BaseException:
            self.num_failed += 1
            raise
        finally:
            if copy.done():
                lane.staging.release(ids)
            else:  # cancelled mid-copy: the thread still writes into these blocks
                copy.add_done_callback(lambda _: lane.staging.release(ids))
        self.num_deliveries += 1
        return Delivered(len(tiers), tiers.count("dram"), tiers.count("ssd"), stats)

    async def close(self) -> None:
        """Abort open transfers and free every staging region. Called once when the service stops."""
        lanes, self._lanes = self._lanes, {}
        for lane in lanes.values():
            await lane.sender.close()
            lane.region.close()

    # ---- private ----

    def _check(self, layout, block_hashes, destination, dst_block_ids, transfer_id) -> None:
        if not transfer_id:
            raise InvalidArgumentError("transfer_id must name the transfer the requester expects")
        if len(dst_block_ids) != len(block_hashes):
            raise InvalidArgumentError(f"{len(dst_block_ids)} destination blocks for {len(block_hashes)} hashes")
        if destination.layout != layout:
            raise InvalidArgumentError("the destination's KV layout differs from the request's")
        try:
            block_nbytes(layout)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        if layout.num_layers <= 0 or layout.block_size <= 0 or layout.num_kv_heads <= 0 or layout.head_dim <= 0:
            raise InvalidArgumentError("the KV layout must have positive layers, block size, heads and head_dim")

    def _lane(self, key: bytes, layout: common_pb2.KVLayout) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            if len(self._lanes) >= MAX_LAYOUTS:
                raise CapacityError(f"the cache delivers blocks of at most {MAX_LAYOUTS} KV layouts")
            region = allocate_region(layout.num_layers, self.staging_blocks, block_nbytes(layout), "grpc")
            sender = Sender(region, layout, backends=self.backends, force=self.force, chaos=self.chaos)
            lane = self._lanes[key] = _Lane(region, StagingPool(self.staging_blocks), sender)
        return lane

    def _copy_in(self, lane: _Lane, key: bytes, block_hashes: Sequence[bytes], ids: list[int]) -> list[str]:
        """Worker thread: copy the leading held blocks into staging blocks ids, under the store's read lease;
        the tier of each block copied."""
        pool = lane.region.array
        shape = (pool.shape[0], 2, pool.shape[3])
        nbytes = int(np.prod(shape))

        def sink(i: int, data: bytes) -> bool:
            if len(data) != nbytes:  # put under this layout with another size: never served
                return False
            pool[:, :, ids[i]] = np.frombuffer(data, dtype=np.uint8).reshape(shape)
            return True

        return [tier for _, _, tier in self.store.get(key, block_hashes, sink)]

    async def _send(self, lane: _Lane, destination, transfer_id: str, dst_block_ids: Sequence[int],
                    src: list[int], timeout: float) -> TransferStats:
        """One transfer: every layer of the staging blocks src into dst_block_ids, then the verified commit."""
        transfer = await lane.sender.open(destination, transfer_id, dst_block_ids, timeout=timeout)
        async with transfer:
            for layer in range(lane.region.num_layers):
                await transfer.send_layer(layer, src)
            return await transfer.commit()
