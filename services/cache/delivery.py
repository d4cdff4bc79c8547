"""Fetch: deliver held blocks into a requester's reserved blocks through the KV transports.

The cache is a transport sender like a prefill worker. Per KV layout it keeps one lane: a staging region shaped
like that layout's pool (`staging_blocks` blocks, allocated on first use and reused) and a `Sender` over it. One
delivery:

1. peeks at how many leading blocks of the chain are held and takes that many staging blocks (at most the whole
   region), sharing those already staged for the same hashes (staging.py); when too few are free it waits up to
   `wait_s`, then delivers nothing (a miss). A delivery takes all its staging blocks at once and never waits
   while holding some, so deliveries cannot deadlock;
2. copies the blocks not staged yet into its fresh staging blocks while the store's read lease holds them (off
   the event loop), and waits for the ones another delivery is copying;
3. opens one transfer into the requester's destination blocks (negotiated as for the prefill→decode handoff: shm
   on one host, else ucx or grpc), sends every layer and commits; the requester verifies every layer's checksum.

A chain can be delivered only in part (a block evicted since the requester's lookup, or more blocks than staging
holds): the transfer must still cover every block the requester expected, so the blocks past the delivered ones
repeat the last delivered block (filler the requester computes over), and the reply says how many lead. Staging
blocks go back on every path: finish, error and cancel (after a copy still running in its thread is done); the
ones filled stay staged for the next delivery of their hashes until their place is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvmesh.services.cache.staging import StagedBlocks
from kvmesh.services.cache.store import BlockStore
from kvmesh.services.common.errors import CapacityError, InvalidArgumentError
from kvmesh.services.common import tls
from kvmesh.services.common.transfer_samples import SENT
from kvmesh.services.common.transfer_telemetry import report
from kvmesh.transports import PREFERENCE, KVRegion, TransferStats, allocate_region, block_nbytes
from kvmesh.transports.sender import Sender
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


@dataclass
class _Lane:
    """One layout's staging region, its free blocks, and the sender that writes out of it."""

    region: KVRegion
    staging: StagedBlocks
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
    def num_staging_staged(self) -> int:
        return sum(lane.staging.num_staged for lane in self._lanes.values())

    @property
    def num_staging_shared(self) -> int:
        return sum(lane.staging.num_shared for lane in self._lanes.values())

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
        entries, fresh = await lane.staging.acquire(block_hashes[:held], self.wait_s)
        if not entries:
            self.num_waits_exhausted += 1
            log.info("staging of %d blocks full for %.3f s: %s gets nothing", lane.staging.num_blocks,
                     self.wait_s, transfer_id)
            return Delivered()
        began = time.perf_counter()  # the fetch as the requester waits for it: tier reads, then the transfer
        copy = asyncio.ensure_future(asyncio.to_thread(self._copy_in, lane, key, [e.block_hash for e in fresh],
                                                       [e.block for e in fresh])) if fresh else None
        try:
            if copy is not None:
                lane.staging.fill(fresh, await asyncio.shield(copy))
            pending = {e.ready for e in entries if not e.ready.done()}  # blocks other deliveries are copying
            if pending:
                await asyncio.wait(pending)  # (wait, unlike gather, never cancels them for their other holders)
            tiers = []
            for entry in entries:  # the leading run that holds bytes
                if entry.tier is None:
                    break
                tiers.append(entry.tier)
            if not tiers:
                return Delivered()
            src = [e.block for e in entries[:len(tiers)]]
            src += [src[-1]] * (len(block_hashes) - len(tiers))
            stats = await self._send(lane, destination, transfer_id, dst_block_ids, src, timeout)
        except BaseException:
            self.num_failed += 1
            raise
        finally:
            if copy is None or copy.done():
                lane.staging.fill(fresh, [])  # what the copy did not fill (it failed) holds nothing
                lane.staging.release(entries)
            else:  # cancelled mid-copy: the thread still writes into the fresh blocks
                copy.add_done_callback(lambda done: self._copied(lane, fresh, entries, done))
        self.num_deliveries += 1
        SENT.observe_fetch(stats, stats.bytes * tiers.count("ssd") // len(block_hashes), time.perf_counter() - began)
        return Delivered(len(tiers), tiers.count("dram"), tiers.count("ssd"), stats)

    @staticmethod
    def _copied(lane: _Lane, fresh, entries, copy: asyncio.Future) -> None:
        """A cancelled delivery's copy finished: what it filled stays staged for others, then release."""
        tiers = copy.result() if not copy.cancelled() and copy.exception() is None else []
        lane.staging.fill(fresh, tiers)
        lane.staging.release(entries)

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
            # a sender's pool: process memory serves every backend
            region = allocate_region(layout.num_layers, self.staging_blocks, block_nbytes(layout))
            sender = Sender(region, layout, backends=self.backends, force=self.force, chaos=self.chaos,
                            observer=report, tls=tls.LIVE if tls.current() else None)
            lane = self._lanes[key] = _Lane(region, StagedBlocks(self.staging_blocks), sender)
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
