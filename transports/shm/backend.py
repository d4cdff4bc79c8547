"""The "shm" backend: the receiver's pool is a POSIX shared-memory segment (segment.py) that a same-host sender
maps once and copies blocks into directly (one copy, no socket); completion and checksums go over the control
channel. Small transfers are staged instead (staging.py): one control message instead of two.
"""

from __future__ import annotations

import asyncio

import numpy as np

from kvmesh.transports.base import Attachment, Backend
from kvmesh.transports.blocks import Run
from kvmesh.transports.shm.segment import (SEGMENT_NAME, close_map, create_segment, open_segment, owner_alive,
                                           reclaim_stale_segments)
from kvmesh.transports.shm.staging import StagedMaps, StagedTransfer, StagingArea, land_staged
from kvmesh.transports.transfer import Transfer

NAME = "shm"  # this backend's registry name
STAGING_STATE = "shm.staging"  # its per-sender state (see Sender.state)
PIECE_BYTES = 2097152  # copy-then-checksum granularity
# Layers up to this size are copied on the event loop (at most ~0.4 ms): a thread hop costs more than that here
# (16 MiB transfers of 2 MiB layers: 5.2-5.6 GB/s inline against 3.1 with a hop per layer).
INLINE_BYTES = 4 << 20


class ShmTransfer(Transfer):
    """Copies each layer's runs straight into the receiver's mapped pool. A copy in a worker thread cannot be
    stopped, so an abort first waits for it: the receiver may reuse the blocks once it hears of the abort."""

    _copying: asyncio.Future | None = None

    async def _in_thread(self, *args) -> None:
        self._copying = asyncio.ensure_future(asyncio.to_thread(self._copy, *args))
        try:
            await asyncio.shield(self._copying)
        finally:
            if self._copying.done():
                self._copying = None

    async def _cancel(self) -> None:
        copying = self._copying
        if copying is not None:
            await asyncio.wait({copying})  # we only need it finished; its error, if any, was the writer's to see
            if not copying.cancelled():
                copying.exception()

    async def _write(self, runs: list[Run], hasher=None) -> None:
        if sum(r.nbytes for r in runs) > INLINE_BYTES:
            await self._in_thread(runs, hasher)
        else:
            self._copy(runs, hasher)

    def _copy(self, runs: list[Run], hasher=None) -> None:
        dst = self.link.array
        for run in runs:
            target = dst[run.layer, run.kv, run.dst_start:run.dst_start + run.num_blocks]
            if hasher is None:
                np.copyto(target, run.src)
                continue
            step = max(1, PIECE_BYTES // run.src.shape[1])  # copy then hash a cache-sized piece
            for i in range(0, run.num_blocks, step):
                np.copyto(target[i:i + step], run.src[i:i + step])
                hasher.update(run.src[i:i + step].reshape(-1).data)

    fuses_checksum = True
    inline_bytes = INLINE_BYTES + 1

    def _write_inline(self, layer: int, pairs: list[tuple[int, int, int]], hasher) -> None:
        for kv in (0, 1):  # the per-layer path of every small transfer: as few Python steps as possible
            src, dst = self.pool[layer, kv], self.link.array[layer, kv]
            for s, d, n in pairs:
                piece = src[s:s + n]
                np.copyto(dst[d:d + n], piece)
                if hasher is not None:
                    hasher.update(piece)


class ShmBackend(Backend):
    """Same-host one-sided copies into the receiver's shm segment; small transfers staged (staging.py)."""

    name = NAME
    same_host_only = True
    one_sided = True
    early_verify = True
    needs_own_pool = True
    transfer_class = ShmTransfer

    @classmethod
    def make_region(cls, shape):
        return create_segment(shape)  # a same-host sender maps the receiver's pool

    @classmethod
    def reclaim_stale(cls) -> list[str]:
        return reclaim_stale_segments()

    @classmethod
    def attach(cls, receiver):
        if receiver.region.backend != NAME or not receiver.region.name:
            return None
        maps = StagedMaps()

        def land(record, staged, verify: bool) -> list[int]:
            # On the loop: at most STAGED_MAX_BYTES (~0.4 ms), and a thread hop would cost a small transfer more.
            source = maps.view(staged, record.want)
            return land_staged(receiver.region.array, source, record.runs, record.num_layers, verify)

        return Attachment(params=receiver.region.name.encode(), close=maps.close, land_staged=land)

    async def connect(self) -> None:
        d = self.descriptor
        shape = (d.layout.num_layers, 2, d.num_blocks, self.sender.region.block_nbytes)
        self.array, self._mem = open_segment(d.backend_params[NAME].decode(), shape)

    def stale(self) -> bool:
        match = SEGMENT_NAME.match(self.descriptor.backend_params[NAME].decode(errors="replace"))
        return match is not None and not owner_alive(int(match.group(1)))

    async def close(self) -> None:
        mem = getattr(self, "_mem", None)
        if mem is not None:
            self.array = None
            close_map(mem)

    def new_transfer(self, transfer_id, dst_ids, deadline, *, local: bool, rendezvous: bool):
        """A staged transfer when it is small, the receiver's control socket is local and a slot is free (one
        control message instead of two); otherwise writes straight into the receiver's pool after an Open."""
        area: StagingArea = self.sender.state(STAGING_STATE, StagingArea)
        nbytes = self.sender.region.num_layers * 2 * dst_ids.size * self.sender.region.block_nbytes
        slot = None if rendezvous or not local or nbytes > area.slot_bytes else area.take()
        if slot is None:
            return ShmTransfer(self, transfer_id, dst_ids, deadline)
        return StagedTransfer(self, transfer_id, dst_ids, deadline, area, slot)


def staging_area(sender) -> StagingArea:
    """The staging area the shm backend keeps on `sender` (made on first use)."""
    return sender.state(STAGING_STATE, StagingArea)
