"""The receiving side: one `Receiver` per receiving worker (decode worker, cache service), owning its region.

A transfer's record lives here: expected -> writing -> ready, or failed (aborted, cancelled, expired, data loss).
Every state holds the lease set by `expect`; when it lapses the record fails and is dropped. All methods run on the
receiver's event loop (the one its grpc.aio server runs on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Sequence

import numpy as np

from kvmesh.transports import errors
from kvmesh.transports.base import (HASH_OFFLOAD_BYTES, PREFERENCE, Attachment, TransferStats, backend_class,
                                    report_recv)
from kvmesh.transports.blocks import as_block_ids, dst_checksums
from kvmesh.transports.record import Record
from kvmesh.transports.region import KVRegion, check_region, host_id as this_host_id
from kvmesh.transports.staging import StagedMaps, land_staged
from kvmesh.v1 import common_pb2

log = logging.getLogger(__name__)

TOMBSTONES = 1024  # failed transfers remembered, so a late `wait` gets the real error
# How long `retire` waits for a one-sided sender that was mid-write when its transfer failed to show it stopped
# (Abort, Commit, or its control connection closing); a sender silent for longer is taken to be hung.
FENCE_S = 5.0
PUMP_S = 0.001  # progress polling period for backends that need it (ucx)


class Receiver:
    """Accepts KV writes into reserved blocks of this worker's region and tells the worker when they landed."""

    def __init__(self, region: KVRegion, layout: common_pb2.KVLayout, *, address: str = "",
                 backends: Sequence[str] = PREFERENCE, host_id: str | None = None, verify: bool = True,
                 local_control: bool = True) -> None:
        check_region(region, layout)
        self.region, self.layout, self.address, self.verify = region, layout, address, verify
        self.host_id = host_id or this_host_id()
        self._attached: dict[str, Attachment] = {}
        for name in backends:
            cls = backend_class(name)
            attachment = None if cls.unavailable_reason() else cls.attach(self)
            if attachment is not None:
                self._attached[name] = attachment
        self._params = {name: a.params for name, a in self._attached.items()}
        self._pump: asyncio.Task | None = None
        if not self._params:
            raise ValueError(f"none of {list(backends)} can serve this region ({region.backend})")
        self._records: dict[str, Record] = {}
        self._tombstones: OrderedDict[str, errors.TransportError] = OrderedDict()
        self._fences: dict[str, asyncio.Future] = {}  # see `retire`
        self._staged = StagedMaps()  # same-host senders' staging segments (staged shm transfers)
        self._local = None  # the control socket for same-host senders (local.py)
        if local_control:
            from kvmesh.transports.local import LocalControlServer
            self._local = LocalControlServer(self)
            self._start_local()

    @property
    def backends(self) -> list[str]:
        """Backends this receiver accepts, best first."""
        return list(self._params)

    @property
    def num_transfers(self) -> int:
        """Live transfer records (0 once everything finished, failed or expired)."""
        return len(self._records)

    def descriptor(self) -> common_pb2.TransportDescriptor:
        """What a sender needs to write here; the worker hands it to senders (e.g. inside a Prefill request)."""
        return common_pb2.TransportDescriptor(
            backends=self.backends, host_id=self.host_id, address=self.address, layout=self.layout,
            num_blocks=self.region.num_blocks, backend_params={k: v for k, v in self._params.items() if v},
            control_socket=self._local.name if self._local is not None else "")

    def expect(self, transfer_id: str, block_ids: Sequence[int], num_layers: int | None = None,
               lease_s: float = 30.0) -> None:
        """Allow a sender to write `block_ids` (all layers, K and V) for `transfer_id`, for at most `lease_s`.

        Called by the receiving worker after reserving the blocks and before asking a sender to fill them. Does
        not block. The blocks must not be reused until `wait` returned or raised (or `cancel` was called and the
        sender had time to stop: one-sided backends cannot be fenced).
        """
        self._start_local()
        if transfer_id in self._records:
            raise errors.InvalidTransfer(f"transfer {transfer_id} already expected")
        layers = self.layout.num_layers if num_layers is None else num_layers
        if layers != self.layout.num_layers:
            raise errors.InvalidTransfer(f"num_layers {layers} != layout's {self.layout.num_layers}")
        if lease_s <= 0:
            raise errors.InvalidTransfer(f"lease_s must be > 0, got {lease_s}")
        try:
            ids = as_block_ids(block_ids, self.region.num_blocks, "block_ids")
        except ValueError as exc:
            raise errors.InvalidTransfer(str(exc)) from None
        if np.unique(ids).size != ids.size:
            raise errors.InvalidTransfer("block_ids repeat a block")
        loop = asyncio.get_running_loop()
        mask = np.zeros(self.region.num_blocks, dtype=bool)
        mask[ids] = True
        record = Record(transfer_id, ids, mask, layers, loop.create_future(),
                         want=layers * 2 * ids.size * self.region.block_nbytes)
        record.future.add_done_callback(_retrieve)
        record.timer = loop.call_later(lease_s, self._expire, record, lease_s)
        self._tombstones.pop(transfer_id, None)
        self._records[transfer_id] = record

    async def wait(self, transfer_id: str, timeout: float | None = None) -> TransferStats:
        """Resolve when every layer of the transfer landed and was verified; the record is then dropped.

        Called by the receiving worker (once per transfer) after `expect`. Raises DataLossError, TransferTimeout
        (lease or `timeout` lapsed; the transfer is then cancelled), TransferAborted, UnknownTransfer.
        """
        record = self._records.get(transfer_id)
        if record is None:
            raise self._tombstones.pop(transfer_id, None) or errors.UnknownTransfer(f"no transfer {transfer_id}")
        try:
            stats = await asyncio.wait_for(asyncio.shield(record.future), timeout)
            report_recv(transfer_id, stats)  # here, so the span joins the waiting request's trace
            return stats
        except asyncio.TimeoutError:
            self._fail(record, errors.TransferTimeout(f"transfer {transfer_id}: wait timed out after {timeout}s"))
            raise self._tombstones.pop(transfer_id) from None
        finally:
            if record.future.done() and self._records.get(transfer_id) is record:
                self._drop(record)
            self._tombstones.pop(transfer_id, None)

    async def retire(self, transfer_id: str, fence_s: float = FENCE_S) -> None:
        """Cancel the transfer if it is still live, and return once no sender can write into its blocks any more,
        so the caller may reuse them. Idempotent; never raises.

        Called by the receiving worker when it releases a request's blocks (finish, cancel, failure). Returns at once
        unless a one-sided sender (shm, ucx: the receiver cannot fence its writes) had opened the transfer and not
        finished it: then when that sender aborts or commits, when its same-host control connection closes (it
        died), or after `fence_s` (logged: it may be hung).
        """
        self.cancel(transfer_id)
        fence = self._fences.get(transfer_id)
        if fence is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(fence), fence_s)
        except asyncio.TimeoutError:
            log.warning("transfer %s: its sender neither aborted nor closed within %.1f s after the transfer "
                        "failed mid-write; releasing its blocks anyway", transfer_id, fence_s)
        finally:
            self._lift_fence(transfer_id)

    @property
    def num_fences(self) -> int:
        """Failed one-sided transfers whose sender has not yet shown it stopped writing."""
        return len(self._fences)

    def cancel(self, transfer_id: str) -> bool:
        """Fail the transfer (its waiter gets TransferAborted) and drop it. Idempotent: False if unknown. The
        blocks are safe to reuse only after `retire` returned (one-sided senders may still be writing)."""
        record = self._records.get(transfer_id)
        if record is None:
            return False
        self._fail(record, errors.TransferAborted(f"transfer {transfer_id} cancelled by receiver"))
        return True

    def servicer(self):
        """The grpc.aio KVTransfer servicer. Prefer `mount`, which also installs a zero-copy Push decoder;
        `kv_pb2_grpc.add_KVTransferServicer_to_server(receiver.servicer(), server)` works too."""
        from kvmesh.transports.service import KVTransferServicer
        return KVTransferServicer(self)

    def mount(self, server) -> None:
        """Add this receiver's KVTransfer service to a grpc.aio server (before `server.start()`)."""
        from kvmesh.transports.service import add_to_server
        add_to_server(self.servicer(), server)

    def close(self, close_region: bool = True) -> None:
        """Fail live transfers, release backend resources and (by default) the region. Idempotent."""
        for record in list(self._records.values()):
            self._fail(record, errors.TransferAborted("receiver closing"))
        for transfer_id in list(self._fences):
            self._lift_fence(transfer_id)
        if self._pump is not None:
            self._pump.cancel()
        if self._local is not None:
            self._local.close()
        self._staged.close()
        attached, self._attached = self._attached, {}
        for attachment in attached.values():
            attachment.close()
        if close_region:
            self.region.close()

    # ---- called by the KVTransfer servicer ----

    def _open(self, request) -> float:
        """An OpenRequest, by whichever message carried it: an Open, or (when the sender skipped the Open round
        trip) a Commit or the first message of a Push call. Opens the transfer if it is still expected; an Open
        for a transfer already being written must agree with the one that opened it. Returns the lease's seconds
        left."""
        tid = request.transfer_id
        record = self._live(tid)
        dst_ok = np.array_equal(np.asarray(request.dst_block_ids, dtype=np.int64), record.dst_ids)
        if record.state == "writing":
            if request.backend != record.backend or request.staged != record.staged or request.layout != self.layout \
                    or not dst_ok:
                raise errors.InvalidTransfer(f"transfer {tid}: its Open disagrees with the one that opened it")
        elif record.state != "expected":
            raise errors.InvalidTransfer(f"transfer {tid} is {record.state}, not expected")
        elif request.layout != self.layout:
            raise errors.LayoutMismatch(f"transfer {tid}: sender layout differs from receiver's")
        elif request.backend not in self._params:
            raise errors.InvalidTransfer(f"backend {request.backend!r} not accepted here ({self.backends})")
        elif not dst_ok:
            raise errors.InvalidTransfer(f"transfer {tid}: dst blocks differ from the reserved ones")
        elif request.staged and request.backend != "shm":
            raise errors.InvalidTransfer(f"transfer {tid}: only shm transfers are staged")
        else:
            record.state, record.backend, record.opened = "writing", request.backend, time.perf_counter()
            record.staged = request.staged
            if self._attached[request.backend].progress is not None and (self._pump is None or self._pump.done()):
                self._pump = asyncio.ensure_future(self._run_pump())
        return max(record.timer.when() - asyncio.get_running_loop().time(), 0.0)

    async def _commit(self, transfer_id: str, backend: str, nbytes: int, checksums: Sequence[int],
                      has_checksums: bool, push_streams: int = 0, open_request=None, staged=None) -> TransferStats:
        self._lift_fence(transfer_id)  # a sender commits after its last write, even to a transfer that failed
        if open_request is not None:
            if open_request.transfer_id != transfer_id or open_request.backend != backend:
                raise errors.InvalidTransfer(f"transfer {transfer_id}: the Commit's Open names another transfer")
            self._open(open_request)
        record = self._live(transfer_id)
        if staged is not None:
            return await self._commit_staged(record, staged, nbytes, checksums, has_checksums)
        if record.state != "writing" or backend != record.backend or record.committing:
            raise errors.InvalidTransfer(f"transfer {transfer_id} is {record.state} via {record.backend!r}")
        record.committing = True
        want = record.want
        if not backend_class(backend).one_sided and nbytes == want and record.nbytes < want:
            record.push_streams = push_streams  # the sender commits without waiting for its Push calls' replies
            record.check_landed()
            await record.landed.wait()
            if self._records.get(transfer_id) is not record:  # aborted, expired or damaged meanwhile
                raise record.future.exception()
        record.state = "verifying"
        if nbytes != want or (not backend_class(backend).one_sided and record.nbytes != want):
            return self._lose(record, f"{record.nbytes if backend == 'grpc' else nbytes} of {want} bytes arrived")
        checksum_seconds = 0.0
        if has_checksums and self.verify:
            t = time.perf_counter()
            got = await self._checksums(record, backend, want)
            checksum_seconds = time.perf_counter() - t
            if self._records.get(transfer_id) is not record:  # expired or aborted while we hashed
                raise record.future.exception()
            bad = [i for i, (a, b) in enumerate(zip(got, checksums)) if a != b]
            if bad or len(checksums) != record.num_layers:
                return self._lose(record, f"checksum mismatch in layers {bad or 'count'}")
        return self._ready(record, checksum_seconds)

    async def _commit_staged(self, record: Record, staged, nbytes: int, checksums: Sequence[int],
                             has_checksums: bool) -> TransferStats:
        """A staged shm transfer: copy the sender's staged bytes into the blocks, checksumming what landed."""
        if record.state != "writing" or not record.staged or record.committing:
            raise errors.InvalidTransfer(f"transfer {record.transfer_id} is {record.state}, not staged")
        record.committing = True
        if nbytes != record.want:
            return self._lose(record, f"{nbytes} of {record.want} bytes staged")
        source = self._staged.view(staged, record.want)
        verify = has_checksums and self.verify
        t = time.perf_counter()
        # On the loop: at most STAGED_MAX_BYTES (~0.4 ms), and a thread hop would cost a small transfer more.
        got = land_staged(self.region.array, source, record.runs, record.num_layers, verify)
        checksum_seconds = time.perf_counter() - t
        if verify and list(checksums) != got:
            bad = [i for i, (a, b) in enumerate(zip(got, checksums)) if a != b]
            return self._lose(record, f"checksum mismatch in layers {bad or 'count'}")
        return self._ready(record, checksum_seconds)

    def _ready(self, record: Record, checksum_seconds: float) -> TransferStats:
        stats = TransferStats(record.backend, record.want, int(record.dst_ids.size), record.num_layers,
                              time.perf_counter() - record.opened, checksum_seconds)
        record.state = "ready"
        record.future.set_result(stats)
        return stats

    async def _checksums(self, record: Record, backend: str, nbytes: int) -> list[int]:
        """Each layer's checksum of what landed: for data that came through Push, the running checksums kept
        while landing it; for one-sided writes, re-read from the region."""
        if not backend_class(backend).one_sided:
            return [record.layer_hashers[i].intdigest() if i in record.layer_hashers else -1
                    for i in range(record.num_layers)]
        rest = [i for i in range(record.num_layers) if i not in record.early]
        args = (self.region.array, record.dst_ids, record.num_layers, rest, record.runs)
        late_bytes = nbytes // record.num_layers * len(rest)
        late = await asyncio.to_thread(dst_checksums, *args) if late_bytes >= HASH_OFFLOAD_BYTES else dst_checksums(*args)
        got = dict(zip(rest, late))
        for layer, future in record.early.items():
            got[layer] = (await future)[0]
        return [got[i] for i in range(record.num_layers)]

    def _layer_written(self, transfer_id: str, layer: int) -> bool:
        """Start verifying one layer of a one-sided transfer in a thread, so Commit has less left to check."""
        record = self._records.get(transfer_id)
        if (record is None or record.state != "writing" or not backend_class(record.backend).one_sided
                or not 0 <= layer < record.num_layers or layer in record.early or not self.verify):
            return False
        args = (self.region.array, record.dst_ids, record.num_layers, [layer], record.runs)
        record.early[layer] = asyncio.ensure_future(asyncio.to_thread(dst_checksums, *args))
        record.early[layer].add_done_callback(_retrieve)
        return True

    def _abort(self, transfer_id: str, reason: str) -> bool:
        record = self._records.get(transfer_id)
        if record is not None:
            self._fail(record, errors.TransferAborted(f"transfer {transfer_id} aborted by sender: {reason}"))
        self._lift_fence(transfer_id)  # the sender stopped writing before it sent this
        return record is not None

    def _sender_gone(self, transfer_id: str) -> None:
        """The same-host sender that opened this transfer closed its control connection (it died or dropped the
        link) before committing: it will write no more, so fail the transfer now rather than at lease expiry."""
        record = self._records.get(transfer_id)
        if record is not None and record.state == "writing":
            self._fail(record, errors.PeerUnavailable(f"transfer {transfer_id}: its sender vanished mid-transfer"))
        self._lift_fence(transfer_id)

    def _lift_fence(self, transfer_id: str) -> None:
        fence = self._fences.pop(transfer_id, None)
        if fence is not None and not fence.done():
            fence.set_result(None)

    # ---- private ----

    def _start_local(self) -> None:
        if self._local is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not on a loop yet: `expect` starts it; senders wait in the socket's backlog until then
        self._local.start()

    async def _run_pump(self) -> None:
        """Drive backends that need the target's progress, while any transfer through them is open."""
        while True:
            busy = {r.backend for r in self._records.values() if r.state in ("writing", "verifying")}
            progress = [a.progress for n, a in self._attached.items() if n in busy and a.progress is not None]
            if not progress:
                return
            for call in progress:
                call()
            await asyncio.sleep(PUMP_S)

    def _live(self, transfer_id: str) -> Record:
        record = self._records.get(transfer_id)
        if record is None:
            raise errors.UnknownTransfer(f"no live transfer {transfer_id}")
        return record

    def _lose(self, record: Record, why: str):
        error = errors.DataLossError(f"transfer {record.transfer_id}: {why}")
        self._fail(record, error)
        raise error

    def _expire(self, record: Record, lease_s: float) -> None:
        if record.state == "ready":  # landed but nobody waited: just drop it
            self._drop(record)
        else:
            self._fail(record, errors.TransferTimeout(f"transfer {record.transfer_id}: lease of {lease_s}s lapsed"
                                                      f" while {record.state}"))

    def _fail(self, record: Record, error: errors.TransportError) -> None:
        if self._records.get(record.transfer_id) is not record:
            return
        if record.state == "writing" and backend_class(record.backend).one_sided and not record.staged:
            self._fences[record.transfer_id] = record.future.get_loop().create_future()  # writes cannot be stopped
            while len(self._fences) > TOMBSTONES:  # never retired: forget the oldest
                self._fences.pop(next(iter(self._fences))).cancel()
        record.state = "failed"
        record.landed.set()
        if not record.future.done():
            record.future.set_exception(error)
        self._tombstones[record.transfer_id] = error
        while len(self._tombstones) > TOMBSTONES:
            self._tombstones.popitem(last=False)
        self._drop(record)

    def _drop(self, record: Record) -> None:
        if record.timer is not None:
            record.timer.cancel()
        self._records.pop(record.transfer_id, None)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # mark retrieved: a failed transfer nobody waits for is not an "unhandled" error
