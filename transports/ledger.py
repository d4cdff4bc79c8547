"""A receiver's book of transfers: the live records with their leases, and the verdicts on them.

A lease measures progress, not patience: every Open, chunk, written layer or Commit renews it, and it lapses
only when nothing of the transfer arrived for `lease_s` (a loaded machine makes a transfer slower, never failed);
an expected transfer that never hears from its sender still lapses `lease_s` after `expect`.

It knows what a transfer must bring and checks what came (byte counts, checksums); it fails, expires and drops
records, remembering failures in the graveyard (fences.py). The `Receiver` owns one and keeps the public API; this
module does the bookkeeping behind it. Runs on the receiver's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Sequence

import numpy as np

import kvmesh.transports.errors as errors
from kvmesh.transports import backend_class
from kvmesh.transports.base import TransferStats
from kvmesh.transports.blocks import as_block_ids
from kvmesh.transports.fences import Graveyard
from kvmesh.transports.record import Record, retrieve

log = logging.getLogger(__name__)


class Ledger:
    """The live records of one receiver, by transfer id, and the graveyard of failed ones."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.graveyard = Graveyard()

    def add(self, transfer_id: str, block_ids, region, num_layers: int, lease_s: float) -> Record:
        """A new expected transfer of `block_ids` of `region` (all layers, K and V), failing when its lease of
        `lease_s` lapses. InvalidTransfer for a bad request."""
        if transfer_id in self.records:
            raise errors.InvalidTransfer(f"transfer {transfer_id} already expected")
        if num_layers != region.num_layers:
            raise errors.InvalidTransfer(f"num_layers {num_layers} != layout's {region.num_layers}")
        if lease_s <= 0:
            raise errors.InvalidTransfer(f"lease_s must be > 0, got {lease_s}")
        try:
            ids = as_block_ids(block_ids, region.num_blocks, "block_ids")
        except ValueError as exc:
            raise errors.InvalidTransfer(str(exc)) from None
        if np.unique(ids).size != ids.size:
            raise errors.InvalidTransfer("block_ids repeat a block")
        loop = asyncio.get_running_loop()
        mask = np.zeros(region.num_blocks, dtype=bool)
        mask[ids] = True
        record = Record(transfer_id, ids, mask, num_layers, loop.create_future(),
                        want=num_layers * 2 * ids.size * region.block_nbytes, lease_s=lease_s, renewed=loop.time())
        record.future.add_done_callback(retrieve)
        record.timer = loop.call_later(lease_s, self._expire, record)
        self.graveyard.unearth(transfer_id)
        self.records[transfer_id] = record
        return record

    def open(self, request, layout, accepted: dict) -> tuple[Record, bool]:
        """An OpenRequest for an expected transfer through one of the `accepted` backends (name -> Attachment):
        the record, and whether this Open opened it (False: a repeat, which must agree with the first)."""
        tid = request.transfer_id
        record = self.live(tid)
        if record.state == "writing":
            record.check_reopen(request, layout)
            return record, False
        if record.state != "expected":
            raise errors.InvalidTransfer(f"transfer {tid} is {record.state}, not expected")
        if request.layout != layout:
            raise errors.LayoutMismatch(f"transfer {tid}: sender layout differs from receiver's")
        if request.backend not in accepted:
            raise errors.InvalidTransfer(f"backend {request.backend!r} not accepted here ({list(accepted)})")
        if not np.array_equal(np.asarray(request.dst_block_ids, dtype=np.int64), record.dst_ids):
            raise errors.InvalidTransfer(f"transfer {tid}: dst blocks differ from the reserved ones")
        if request.staged and accepted[request.backend].land_staged is None:
            raise errors.InvalidTransfer(f"transfer {tid}: {request.backend} transfers are never staged")
        record.state, record.backend, record.opened = "writing", request.backend, time.perf_counter()
        record.staged, record.opened_ns = request.staged, time.time_ns()
        return record, True

    def renew(self, record: Record, listener: Callable[[str], None] | None = None) -> None:
        """Something of a live transfer arrived: its lease runs from now; tell `listener` (never raises: a
        listener's failure must not fail the transfer)."""
        record.renewed = asyncio.get_running_loop().time()
        if listener is None:
            return
        try:
            listener(record.transfer_id)
        except Exception:  # noqa: BLE001
            log.exception("transfer %s: its progress listener failed", record.transfer_id)

    @staticmethod
    def lease_left(record: Record) -> float:
        """Seconds before the record's lease lapses unless something arrives."""
        return max(record.renewed + record.lease_s - asyncio.get_running_loop().time(), 0.0)

    def live(self, transfer_id: str) -> Record:
        """The live record of a transfer; UnknownTransfer if there is none."""
        record = self.records.get(transfer_id)
        if record is None:
            raise errors.UnknownTransfer(f"no live transfer {transfer_id}")
        return record

    def is_live(self, record: Record) -> bool:
        """The record is still the live one for its transfer (not failed, expired or dropped meanwhile)."""
        return self.records.get(record.transfer_id) is record

    def fail(self, record: Record, error: errors.TransportError) -> None:
        """Fail a live record with `error` and drop it (its waiter gets the error). Idempotent."""
        if not self.is_live(record):
            return
        fence = record.state == "writing" and backend_class(record.backend).one_sided and not record.staged
        self.graveyard.bury(record.transfer_id, error, fence)  # one-sided writes cannot be stopped: fence them
        record.state = "failed"
        record.landed.set()
        if not record.future.done():
            record.future.set_exception(error)
        self.drop(record)

    def lose(self, record: Record, why: str):
        """Fail the record with DataLossError, and raise it."""
        error = errors.DataLossError(f"transfer {record.transfer_id}: {why}")
        self.fail(record, error)
        raise error

    def drop(self, record: Record) -> None:
        """Forget a record (landed and collected, or failed)."""
        if record.timer is not None:
            record.timer.cancel()
        self.records.pop(record.transfer_id, None)

    async def verify(self, record: Record, request, pool: np.ndarray, verify: bool) -> TransferStats:
        """A Commit for data written into the pool: wait for data still in flight, check byte counts and (when
        both sides verify) each layer's checksum of what landed; resolve the record. Raises DataLossError."""
        one_sided = backend_class(record.backend).one_sided
        if not one_sided and request.nbytes == record.want and record.nbytes < record.want:
            record.push_streams = request.push_streams  # the sender commits without waiting for its data calls
            record.check_landed()
            await record.landed.wait()
            if not self.is_live(record):  # aborted, expired or damaged meanwhile
                raise record.future.exception()
        record.state = "verifying"
        if request.nbytes != record.want or (not one_sided and record.nbytes != record.want):
            self.lose(record, f"{request.nbytes if one_sided else record.nbytes} of {record.want} bytes arrived")
        checksum_seconds = 0.0
        if request.has_checksums and verify:
            t = time.perf_counter()
            got = await record.landed_checksums(pool, one_sided)
            checksum_seconds = time.perf_counter() - t
            if not self.is_live(record):  # expired or aborted while we hashed
                raise record.future.exception()
            self.check_sums(record, got, request.layer_checksums)
        return self.ready(record, checksum_seconds)

    def land_staged(self, record: Record, request, land: Callable, verify: bool) -> TransferStats:
        """A Commit that carries staged bytes: `land(record, staged, verify)` (the backend's) copies them into the
        blocks and returns each layer's checksum of what landed; resolve the record. Raises DataLossError."""
        if request.nbytes != record.want:
            self.lose(record, f"{request.nbytes} of {record.want} bytes staged")
        verify = request.has_checksums and verify
        t = time.perf_counter()
        got = land(record, request.staged, verify)
        if verify:
            self.check_sums(record, got, request.layer_checksums)
        return self.ready(record, time.perf_counter() - t)

    def check_sums(self, record: Record, got: list[int], want: Sequence[int]) -> None:
        """Fail the record (DataLossError) unless every layer's checksum matches the sender's."""
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        if bad or len(want) != record.num_layers:
            self.lose(record, f"checksum mismatch in layers {bad or 'count'}")

    def ready(self, record: Record, checksum_seconds: float) -> TransferStats:
        """Resolve a verified record with its stats."""
        stats = TransferStats(record.backend, record.want, int(record.dst_ids.size), record.num_layers,
                              time.perf_counter() - record.opened, checksum_seconds, record.transfer_id, "recv",
                              record.opened_ns, time.time_ns())
        record.state = "ready"
        record.future.set_result(stats)
        return stats

    def close(self) -> None:
        """Fail every live record and lift every fence (the receiver is closing)."""
        for record in list(self.records.values()):
            self.fail(record, errors.TransferAborted("receiver closing"))
        self.graveyard.close()

    def _expire(self, record: Record) -> None:
        if record.state == "ready":  # landed but nobody waited: just drop it
            self.drop(record)
        elif (left := self.lease_left(record)) > 0:  # it moved since the timer was set: wait out the rest
            record.timer = asyncio.get_running_loop().call_later(left, self._expire, record)
        else:
            self.fail(record, errors.TransferTimeout(f"transfer {record.transfer_id}: lease of {record.lease_s}s "
                                                     f"lapsed while {record.state} (nothing arrived for that long)"))
