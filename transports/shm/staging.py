"""Staged "shm" transfers: the eager protocol for small same-host transfers, one control message instead of two.

A one-sided write into the receiver's blocks must wait for the Open reply: only then has the receiver promised the
blocks are still reserved for this transfer (a transfer that expired before its Open would otherwise write into
blocks already given to another request). For a small transfer that round trip is most of its time. So a small
transfer is staged instead, like an MPI eager send: the sender copies each layer into a slot of a shared-memory
segment of its own (checksumming as it copies), and its Commit carries the Open and the slot's place. The
receiver checks the reservation, then copies the slot into its blocks and checksums what landed — it alone writes
its blocks, so nothing needs fencing. Large transfers keep the rendezvous (Open, then writes straight into the
receiver's blocks, overlapped with the sender's compute).
"""

from __future__ import annotations

import mmap
import os
import time
from collections import OrderedDict

import numpy as np
import xxhash

import kvmesh.transports.errors as errors
from kvmesh.transports.base import OFFLOAD_BYTES
from kvmesh.transports.blocks import Run
from kvmesh.transports.shm.segment import SEGMENT_NAME, create_segment, owner_alive, segment_path
from kvmesh.transports.transfer import Transfer
from kvmesh.v1 import kv_pb2

#: Transfers up to this size are staged (when the sender has a free slot); larger ones use the rendezvous.
STAGED_MAX_BYTES = 2 << 20
STAGING_SLOTS = 8  # concurrent staged transfers per sending process: 16 MiB of /dev/shm, made on first use
#: A slot whose Commit went unanswered (timeout, abort) is not reused for this long: the receiver may still be
#: copying it. (Reusing it earlier could only make that copy fail its checksum, never land wrong bytes.)
QUARANTINE_S = 5.0
PIECE_BYTES = 1 << 20  # the receiver copies and checksums in pieces this size, while they are hot in cache
MAPS_KEPT = 8  # senders' segments a receiver keeps mapped


class StagingArea:
    """The sender's slots: one shm segment of STAGING_SLOTS × STAGED_MAX_BYTES, created on first use."""

    def __init__(self, slots: int | None = None, slot_bytes: int | None = None) -> None:
        self.slots, self.slot_bytes = slots or STAGING_SLOTS, slot_bytes or STAGED_MAX_BYTES
        self.region = None
        self._free = list(range(self.slots - 1, -1, -1))
        self._quarantined: list[tuple[float, int]] = []

    def take(self) -> int | None:
        """A free slot's index, or None when every slot is busy (the caller then uses the rendezvous)."""
        now = time.monotonic()
        while self._quarantined and self._quarantined[0][0] <= now:
            self._free.append(self._quarantined.pop(0)[1])
        if not self._free:
            return None
        if self.region is None:
            self.region = create_segment((self.slots, self.slot_bytes))
        return self._free.pop()

    def give(self, slot: int, clean: bool) -> None:
        """Return a slot; `clean`: the receiver answered, so nobody reads it any more."""
        if clean:
            self._free.append(slot)
        else:
            self._quarantined.append((time.monotonic() + QUARANTINE_S, slot))

    def view(self, slot: int, nbytes: int) -> np.ndarray:
        """The first `nbytes` of a slot, as a flat uint8 array."""
        return self.region.array[slot, :nbytes]

    @property
    def num_busy(self) -> int:
        """Slots taken or quarantined (0 when nothing leaks)."""
        return self.slots - len(self._free) - len(self._quarantined)

    @property
    def num_quarantined(self) -> int:
        """Slots not reused yet because their Commit went unanswered."""
        return len(self._quarantined)

    def close(self) -> None:
        """Unlink the segment (called by `Sender.close`)."""
        if self.region is not None:
            self.region.close()
            self.region = None


class StagedTransfer(Transfer):
    """A small shm transfer: layers are copied into the sender's staging slot; the Commit carries the Open."""

    carries_open = True
    stages_bytes = True
    fuses_checksum = True
    inline_bytes = OFFLOAD_BYTES

    def __init__(self, link, transfer_id: str, dst_ids: np.ndarray, deadline: float, staging: StagingArea,
                 slot: int) -> None:
        super().__init__(link, transfer_id, dst_ids, deadline)
        self.staging, self.slot = staging, slot
        n, block = self.dst_ids.size, self.pool.shape[3]
        self.staged = staging.view(slot, self.pool.shape[0] * 2 * n * block).reshape(self.pool.shape[0], 2, n, block)
        self._seq: dict[int, int] | None = None  # dst block -> its position in sequence order (made when needed)
        self._commit_sent = False

    def _write_inline(self, layer: int, pairs: list[tuple[int, int, int]], hasher) -> None:
        for kv in (0, 1):
            src, dst, pos = self.pool[layer, kv], self.staged[layer, kv], 0
            for s, _, n in pairs:
                piece = src[s:s + n]
                np.copyto(dst[pos:pos + n], piece)
                if hasher is not None:
                    hasher.update(piece)
                pos += n

    def _copy(self, runs: list[Run], hasher=None) -> None:
        if self._seq is None:
            self._seq = {int(d): i for i, d in enumerate(self.dst_ids)}
        for run in runs:
            pos = self._seq[run.dst_start]
            np.copyto(self.staged[run.layer, run.kv, pos:pos + run.num_blocks], run.src)
            if hasher is not None:
                hasher.update(run.src.reshape(-1).data)

    async def _write(self, runs: list[Run], hasher=None) -> None:
        self._copy(runs, hasher)  # staged layers are small (the whole transfer is at most STAGED_MAX_BYTES)

    def _commit_fields(self) -> dict:
        self._commit_sent = True
        staged = kv_pb2.StagedBytes(segment=self.staging.region.name, offset=self.slot * self.staging.slot_bytes,
                                    segment_bytes=self.staging.region.array.nbytes)
        return {"open": self.open_request, "staged": staged}

    async def commit(self):
        """As `Transfer.commit`; then the slot is free again (or quarantined, when the receiver did not answer and
        may still be reading it)."""
        try:
            stats = await super().commit()
        except errors.TransportError as exc:  # an answer means the receiver stopped reading the slot
            self._release_slot(clean=not isinstance(exc, (errors.TransferTimeout, errors.PeerUnavailable)))
            raise
        except BaseException:
            self._release_slot(clean=False)
            raise
        self._release_slot(clean=True)
        return stats

    async def _cancel(self) -> None:
        if not self._commit_sent:  # else `commit` releases the slot when it ends
            self._release_slot(clean=True)

    def _release_slot(self, clean: bool) -> None:
        if self.slot is not None:
            self.staging.give(self.slot, clean)
            self.slot = None


class StagedMaps:
    """The receiver's read-only mappings of senders' staging segments, by name (a few kept, oldest dropped)."""

    def __init__(self) -> None:
        self._maps: OrderedDict[str, tuple[np.ndarray, mmap.mmap]] = OrderedDict()

    def view(self, staged: kv_pb2.StagedBytes, nbytes: int) -> np.ndarray:
        """The staged bytes as a flat uint8 array; InvalidTransfer for a bad name or bounds."""
        try:
            path = segment_path(staged.segment)
        except ValueError as exc:
            raise errors.InvalidTransfer(str(exc)) from None
        if not (0 <= staged.offset and staged.offset + nbytes <= staged.segment_bytes):
            raise errors.InvalidTransfer(f"staged bytes [{staged.offset}, +{nbytes}) outside segment "
                                         f"{staged.segment} of {staged.segment_bytes} bytes")
        array = self._map(path, staged.segment, staged.segment_bytes)
        return array[staged.offset:staged.offset + nbytes]

    def _map(self, path: str, name: str, size: int) -> np.ndarray:
        held = self._maps.get(name)
        if held is not None and held[0].size == size:
            self._maps.move_to_end(name)
            return held[0]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise errors.PeerUnavailable(f"staging segment {name}: {exc}") from None
        try:
            if os.fstat(fd).st_size < size:
                raise errors.InvalidTransfer(f"staging segment {name} is smaller than {size} bytes")
            mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        for gone in [n for n in self._maps if not _owner_alive(n)]:  # a sender that died: its memory can go
            self._unmap(self._maps.pop(gone))
        self._maps[name] = (np.frombuffer(mem, dtype=np.uint8), mem)
        while len(self._maps) > MAPS_KEPT:
            self._unmap(self._maps.popitem(last=False)[1])
        return self._maps[name][0]

    def close(self) -> None:
        """Unmap every segment held."""
        while self._maps:
            self._unmap(self._maps.popitem()[1])

    @staticmethod
    def _unmap(held: tuple[np.ndarray, mmap.mmap]) -> None:
        try:
            held[1].close()
        except BufferError:  # a copy still reads it; the mapping goes when that view does
            pass


def _owner_alive(name: str) -> bool:
    match = SEGMENT_NAME.match(name)
    return match is not None and owner_alive(int(match.group(1)))


def land_staged(pool: np.ndarray, staged: np.ndarray, runs: list[tuple[int, int]], num_layers: int,
                verify: bool) -> list[int]:
    """Copy staged bytes (layer, then K/V, then blocks in dst order) into the pool's dst runs; return each layer's
    checksum of what landed in the pool (hashed piece by piece right after its copy, while it is in cache)."""
    block = pool.shape[3]
    n = sum(count for _, count in runs)
    src = staged.reshape(num_layers, 2, n, block)
    step = max(1, PIECE_BYTES // block)
    sums = []
    for layer in range(num_layers):
        hasher = xxhash.xxh3_64() if verify else None
        for kv in (0, 1):
            pos = 0
            for d, count in runs:
                for i in range(0, count, step):
                    k = min(step, count - i)
                    target = pool[layer, kv, d + i:d + i + k]
                    np.copyto(target, src[layer, kv, pos + i:pos + i + k])
                    if hasher is not None:
                        hasher.update(target)
                pos += count
        sums.append(hasher.intdigest() if hasher is not None else 0)
    return sums

