"""The receiving side: one `Receiver` per receiving worker (decode worker, cache service), owning its region.

A transfer's record (record.py) lives here: expected -> writing -> verifying -> ready, or failed (aborted,
cancelled, expired, data loss). Every state holds the lease set by `expect`, renewed by whatever of the transfer
arrives (`on_progress`); when nothing arrived for that long, the record fails. The worker calls `expect`, `wait`,
`retire`, `cancel`; the control channels (service.py, local.py) and backends call the `on_*` methods and
`record`/`fail`. All methods run on the receiver's event loop (the one its grpc.aio server runs on).
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

import kvmesh.transports.errors as errors
from kvmesh.transports import PREFERENCE, backend_class
from kvmesh.transports.aio import notify
from kvmesh.transports.base import Attachment, Observer, TransferStats
from kvmesh.transports.ledger import Ledger
from kvmesh.transports.local import LocalControlServer
from kvmesh.transports.record import Record
from kvmesh.transports.region import KVRegion, check_region, host_id as this_host_id
from kvmesh.transports.service import KVTransferServicer, add_to_server
from kvmesh.v1 import common_pb2

# How long `retire` waits for a one-sided sender that was mid-write when its transfer failed to show it stopped
# (Abort, Commit, or its control connection closing); a sender silent for longer is taken to be hung.
FENCE_S = 5.0
PUMP_S = 0.001  # progress polling period for backends that need it (ucx)


class Receiver:
    """Accepts KV writes into reserved blocks of this worker's region and tells the worker when they landed.

    `observer` is called with every transfer's stats when `wait` returns them (see `base.Observer`)."""

    def __init__(self, region: KVRegion, layout: common_pb2.KVLayout, *, address: str = "",
                 backends: Sequence[str] = PREFERENCE, host_id: str | None = None, verify: bool = True,
                 local_control: bool = True, observer: Observer | None = None,
                 progress_listener: Callable[[str], None] | None = None) -> None:
        check_region(region, layout)
        self.region, self.layout, self.address, self.verify = region, layout, address, verify
        self.host_id, self.observer, self.progress_listener = host_id or this_host_id(), observer, progress_listener
        self._attached: dict[str, Attachment] = {}
        for name in backends:
            cls = backend_class(name)
            attachment = None if cls.unavailable_reason() else cls.attach(self)
            if attachment is not None:
                self._attached[name] = attachment
        self._params = {name: a.params for name, a in self._attached.items()}
        self._pump: asyncio.Task | None = None
        if not self._attached:
            raise ValueError(f"none of {list(backends)} can serve this region ({region.backend})")
        self._ledger = Ledger()
        #: The control socket for same-host senders (local.py), or None.
        self.local = LocalControlServer(self) if local_control else None
        self._start_local()

    @property
    def backends(self) -> list[str]:
        """Backends this receiver accepts, best first."""
        return list(self._params)

    @property
    def num_transfers(self) -> int:
        """Live transfer records (0 once everything finished, failed or expired)."""
        return len(self._ledger.records)

    @property
    def num_fences(self) -> int:
        """Failed one-sided transfers whose sender has not yet shown it stopped writing."""
        return self._ledger.graveyard.num_fences

    def descriptor(self) -> common_pb2.TransportDescriptor:
        """What a sender needs to write here; the worker hands it to senders (e.g. inside a Prefill request)."""
        return common_pb2.TransportDescriptor(
            backends=self.backends, host_id=self.host_id, address=self.address, layout=self.layout,
            num_blocks=self.region.num_blocks,
            backend_params={k: v for k, v in self._params.items() if v},
            control_socket=self.local.name if self.local is not None else "")

    def expect(self, transfer_id: str, block_ids: Sequence[int], num_layers: int | None = None,
               lease_s: float = 30.0) -> None:
        """Allow a sender to write `block_ids` (all layers, K and V) for `transfer_id`, for at most `lease_s`.

        Called by the receiving worker after reserving the blocks and before asking a sender to fill them. Does
        not block. The blocks must not be reused until `wait` returned or raised (or `retire` returned).
        """
        self._start_local()
        self._ledger.add(transfer_id, block_ids, self.region, self.layout.num_layers if num_layers is None
                         else num_layers, lease_s)

    async def wait(self, transfer_id: str, timeout: float | None = None) -> TransferStats:
        """Resolve when every layer of the transfer landed and was verified; the record is then dropped.

        Called by the receiving worker (once per transfer) after `expect`. Raises DataLossError, TransferTimeout
        (lease or `timeout` lapsed; the transfer is then cancelled), TransferAborted, UnknownTransfer.
        """
        ledger = self._ledger
        record = ledger.records.get(transfer_id)
        if record is None:
            raise ledger.graveyard.unearth(transfer_id) or errors.UnknownTransfer(f"no transfer {transfer_id}")
        try:
            stats = await asyncio.wait_for(asyncio.shield(record.future), timeout)
            notify(self.observer, stats)  # here, so a span the observer makes joins the waiting request's trace
            return stats
        except asyncio.TimeoutError:
            self.fail(record, errors.TransferTimeout(f"transfer {transfer_id}: wait timed out after {timeout}s"))
            raise ledger.graveyard.unearth(transfer_id) from None
        finally:
            if record.future.done() and ledger.is_live(record):
                ledger.drop(record)
            ledger.graveyard.unearth(transfer_id)

    async def retire(self, transfer_id: str, fence_s: float = FENCE_S) -> None:
        """Cancel the transfer if it is still live, and return once no sender can write into its blocks any more,
        so the caller may reuse them. Idempotent; never raises.

        Called by the receiving worker when it releases a request's blocks (finish, cancel, failure). Returns at once
        unless a one-sided sender (the receiver cannot fence its writes) had opened the transfer and not finished
        it: then when that sender aborts or commits, when its same-host control connection closes (it died), or
        after `fence_s` (logged: it may be hung).
        """
        self.cancel(transfer_id)
        await self._ledger.graveyard.wait(transfer_id, fence_s)

    def cancel(self, transfer_id: str) -> bool:
        """Fail the transfer (its waiter gets TransferAborted) and drop it. Idempotent: False if unknown. The
        blocks are safe to reuse only after `retire` returned (one-sided senders may still be writing)."""
        record = self._ledger.records.get(transfer_id)
        if record is None:
            return False
        self.fail(record, errors.TransferAborted(f"transfer {transfer_id} cancelled by receiver"))
        return True

    def servicer(self) -> KVTransferServicer:
        """The grpc.aio KVTransfer servicer: control messages, and what this receiver's backends serve (e.g. Push).
        Register it with `service.add_to_server`; or use `mount`."""
        handlers = {}
        for attachment in self._attached.values():
            handlers.update(attachment.handlers)
        return KVTransferServicer(self, handlers)

    def mount(self, server) -> None:
        """Add this receiver's KVTransfer service to a grpc.aio server (before `server.start()`)."""
        add_to_server(self.servicer(), server)

    def close(self, close_region: bool = True) -> None:
        """Fail live transfers, release backend resources and (by default) the region. Idempotent."""
        self._ledger.close()
        if self._pump is not None:
            self._pump.cancel()
        if self.local is not None:
            self.local.close()
        attached, self._attached = self._attached, {}
        for attachment in attached.values():
            attachment.close()
        if close_region:
            self.region.close()

    # ---- called by the control channels (service.py, local.py) and by backends ----

    def on_open(self, request) -> float:
        """An OpenRequest, by whichever message carried it: an Open, or (when the sender skipped the Open round
        trip) a Commit or a data call's first message. Opens the transfer if it is still expected; an Open for a
        transfer already being written must agree with the one that opened it. Returns the lease's seconds left."""
        record, opened = self._ledger.open(request, self.layout, self._attached)
        self.on_progress(record)
        if opened and self._attached[record.backend].progress is not None and (self._pump is None or self._pump.done()):
            self._pump = asyncio.ensure_future(self._run_pump())
        return self._ledger.lease_left(record)

    async def on_commit(self, request) -> TransferStats:
        """A CommitRequest: wait for data still in flight, verify what landed, and resolve the transfer."""
        tid, backend = request.transfer_id, request.backend
        self._ledger.graveyard.lift(tid)  # a sender commits after its last write, even to a transfer that failed
        if request.HasField("open"):
            if request.open.transfer_id != tid or request.open.backend != backend:
                raise errors.InvalidTransfer(f"transfer {tid}: the Commit's Open names another transfer")
            self.on_open(request.open)
        record, staged = self.record(tid), request.HasField("staged")
        self.on_progress(record)
        wrong_kind = not record.staged if staged else backend != record.backend
        if record.state != "writing" or record.committing or wrong_kind:
            raise errors.InvalidTransfer(f"transfer {tid} is {record.state}"
                                         + (", not staged" if staged else f" via {record.backend!r}"))
        record.committing = True
        if staged:
            return self._ledger.land_staged(record, request, self._attached[record.backend].land_staged, self.verify)
        return await self._ledger.verify(record, request, self.region.array, self.verify)

    def on_abort(self, transfer_id: str, reason: str) -> bool:
        """The sender aborted: fail the transfer. False when it was not live."""
        record = self._ledger.records.get(transfer_id)
        if record is not None:
            self.fail(record, errors.TransferAborted(f"transfer {transfer_id} aborted by sender: {reason}"))
        self._ledger.graveyard.lift(transfer_id)  # the sender stopped writing before it sent this
        return record is not None

    def on_layer_written(self, transfer_id: str, layer: int) -> bool:
        """A hint that a layer is in place (one-sided: verify it early; else False), or, layer -1, that it moves."""
        record = self._ledger.records.get(transfer_id)
        if record is not None:
            self.on_progress(record)
        if record is None or record.state != "writing" or not backend_class(record.backend).one_sided \
                or not self.verify or record.staged:  # staged bytes are not in the blocks before the Commit
            return False
        return record.verify_early(self.region.array, layer)

    def on_progress(self, record: Record) -> None:
        """Something of a transfer arrived: its lease runs from now; `progress_listener` (must not block) hears."""
        self._ledger.renew(record, self.progress_listener)

    def on_sender_gone(self, transfer_id: str) -> None:
        """The same-host sender that opened this transfer closed its control connection (it died or dropped the
        link) before committing: it will write no more, so fail the transfer now rather than at lease expiry."""
        record = self._ledger.records.get(transfer_id)
        if record is not None and record.state == "writing":
            self.fail(record, errors.PeerUnavailable(f"transfer {transfer_id}: its sender vanished mid-transfer"))
        self._ledger.graveyard.lift(transfer_id)

    def record(self, transfer_id: str) -> Record:
        """The live record of a transfer; UnknownTransfer if there is none."""
        return self._ledger.live(transfer_id)

    def fail(self, record: Record, error: errors.TransportError) -> None:
        """Fail a live transfer with `error` and drop it (its waiter gets the error). Idempotent."""
        self._ledger.fail(record, error)

    # ---- private ----

    def _start_local(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not on a loop yet: `expect` starts it; senders wait in the socket's backlog until then
        if self.local is not None:
            self.local.start()

    async def _run_pump(self) -> None:
        """Drive backends that need the target's progress, while any transfer through them is open."""
        while True:
            busy = {r.backend for r in self._ledger.records.values() if r.state in ("writing", "verifying")}
            progress = [a.progress for n, a in self._attached.items() if n in busy and a.progress is not None]
            if not progress:
                return
            for call in progress:
                call()
            await asyncio.sleep(PUMP_S)
