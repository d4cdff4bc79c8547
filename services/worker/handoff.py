"""The KV handoff state machine: one record per request on the decode worker, a mirror on the prefill worker.

    reserved → writing → ready → decoding → released
          ╰──────────┴───────┴─────────┴──→ failed | expired

Every state but the final ones holds a lease. Progress renews it — a state change, and (`renew`) every layer
or chunk of its KV transfer that moves, however slowly — and it lapses only when nothing moved for its length;
the record then expires and its release callbacks run (free the blocks, cancel the transfer, tell the peer).
Release is idempotent: releasing twice, or releasing a record that already failed or expired, runs the callbacks
once. Every transport backend and every path (finish, cancel, failure, lease) ends here, so there is one set of
cleanup rules. Work that arrives for a record already ended (a late transfer, a late READY) is dropped quietly:
`HandoffEnded`, a typed error with the status of how the record ended, counted by cause, never a traceback.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from kvmesh.services.common import errors, metrics

log = logging.getLogger(__name__)

REMEMBER_ENDED = 4096  # how many ended records' endings a table keeps, to name them when late work arrives


class HandoffState(enum.Enum):
    """Where a request's KV handoff stands; RELEASED, FAILED and EXPIRED are final."""
    RESERVED = "reserved"
    WRITING = "writing"
    READY = "ready"
    DECODING = "decoding"
    RELEASED = "released"
    FAILED = "failed"
    EXPIRED = "expired"


FINAL = {HandoffState.RELEASED, HandoffState.FAILED, HandoffState.EXPIRED}
NEXT = {
    HandoffState.RESERVED: {HandoffState.WRITING, HandoffState.READY},
    HandoffState.WRITING: {HandoffState.READY},
    HandoffState.READY: {HandoffState.DECODING},
    HandoffState.DECODING: set(),
}

Cleanup = Callable[[], Awaitable[None] | None]


class HandoffEnded(errors.MeshError):
    """Work arrived for a request whose handoff already ended: it is dropped, and the request ends with the status
    of how its handoff ended (DEADLINE_EXCEEDED when its lease lapsed, UNAVAILABLE otherwise)."""

    grpc_status = grpc.StatusCode.UNAVAILABLE


@dataclass
class Handoff:
    """One request's handoff record."""

    request_id: str
    lease_s: float
    state: HandoffState = HandoffState.RESERVED
    deadline: float = 0.0
    reason: str = ""
    cleanups: list[Cleanup] = field(default_factory=list)

    def renew(self) -> None:
        """Push the lease's deadline lease_s into the future (on progress)."""
        self.deadline = time.monotonic() + self.lease_s


class HandoffTable:
    """The live handoff records of one worker, and the task that expires lapsed leases."""

    def __init__(self, lease_s: float, sweep_s: float = 0.1):
        self.lease_s = lease_s
        self.sweep_s = sweep_s
        self._records: dict[str, Handoff] = {}
        self._ended: OrderedDict[str, tuple[HandoffState, str]] = OrderedDict()  # the latest endings, by request
        self._sweeper: asyncio.Task | None = None
        self._late: set[asyncio.Future] = set()  # cleanups of resources taken after their record ended
        self.num_expired = 0
        self.num_late = 0  # late work dropped (see `ended`)

    def __len__(self) -> int:
        return len(self._records)

    def count(self, *states: HandoffState) -> int:
        """How many open handoffs are in any of `states` (a worker's load: waiting for KV, decoding)."""
        return sum(1 for record in self._records.values() if record.state in states)

    def get(self, request_id: str) -> Handoff | None:
        """The live record of a request, or None."""
        return self._records.get(request_id)

    def open(self, request_id: str, lease_s: float | None = None) -> Handoff:
        """Start a record in RESERVED; a request id can hold one live record at a time."""
        if request_id in self._records:
            raise KeyError(f"request {request_id!r} already has a live KV handoff")
        record = self._records[request_id] = Handoff(request_id, lease_s or self.lease_s)
        record.renew()
        return record

    def on_release(self, request_id: str, cleanup: Cleanup) -> None:
        """Run cleanup when the record ends, however it ends (last added, first run). When it has ended already,
        run it now (what it frees was taken too late to be freed with the record) and raise HandoffEnded."""
        record = self._records.get(request_id)
        if record is None:
            task = asyncio.ensure_future(_run_cleanups(request_id, [cleanup]))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            raise self.ended(request_id, "a resource taken")
        record.cleanups.append(cleanup)

    def ended(self, request_id: str, what: str) -> HandoffEnded:
        """The error for late work (`what`, e.g. "the move to ready") on a request whose record ended; counted and
        logged at debug level: a late arrival is expected after an expiry or an abort, not a fault."""
        state, reason = self._ended.get(request_id, (HandoffState.RELEASED, "ended"))
        self.num_late += 1
        metrics.HANDOFF_LATE.labels(cause=state.value).inc()
        log.debug("handoff %s: %s arrived after it %s (%s); dropped", request_id, what, state.value, reason)
        error = HandoffEnded(f"request {request_id} already {state.value} on this worker ({reason}): {what} "
                             f"arrived too late")
        if state is HandoffState.EXPIRED:
            error.grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED
        return error

    def advance(self, request_id: str, state: HandoffState) -> Handoff:
        """Move a live record forward, renewing its lease; HandoffEnded when it already ended."""
        record = self._records.get(request_id)
        if record is None:
            raise self.ended(request_id, f"the move to {state.value}")
        if state is not record.state and state not in NEXT[record.state]:
            raise ValueError(f"handoff {request_id}: {record.state.value} → {state.value} is not a transition")
        record.state = state
        record.renew()
        return record

    def renew(self, request_id: str) -> None:
        """Renew a live record's lease (its transfer moved); no-op when the request has none."""
        record = self._records.get(request_id)
        if record is not None:
            record.renew()

    async def end(self, request_id: str, state: HandoffState = HandoffState.RELEASED, reason: str = "") -> bool:
        """End a record (released, failed or expired) and run its cleanups; False if it had already ended."""
        record = self._records.pop(request_id, None)
        if record is None:
            return False
        record.state, record.reason = state, reason
        self._ended[request_id] = (state, reason)
        while len(self._ended) > REMEMBER_ENDED:
            self._ended.popitem(last=False)
        await _run_cleanups(request_id, reversed(record.cleanups))
        return True

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            now = time.monotonic()
            for record in [r for r in self._records.values() if r.deadline < now]:
                self.num_expired += 1
                log.warning("handoff %s expired in state %s", record.request_id, record.state.value)
                await self.end(record.request_id, HandoffState.EXPIRED, f"lease of {record.lease_s:g} s lapsed")

    def start(self) -> None:
        """Start expiring lapsed leases (on the running event loop)."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def end_all(self, reason: str) -> int:
        """End every live record as FAILED with reason (their requests fail UNAVAILABLE: a decode worker's streams
        are migrated by the gateway); how many there were."""
        request_ids = list(self._records)
        for request_id in request_ids:
            await self.end(request_id, HandoffState.FAILED, reason)
        return len(request_ids)

    async def close(self) -> None:
        """Stop expiring and end every live record."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.end_all("worker stopping")
        if self._late:
            await asyncio.gather(*self._late, return_exceptions=True)


async def _run_cleanups(request_id: str, cleanups) -> None:
    for cleanup in cleanups:
        try:
            result = cleanup()
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # one failed cleanup must not keep the others from running
            log.exception("cleanup of handoff %s failed", request_id)
