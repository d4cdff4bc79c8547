"""The KV handoff state machine: one record per request on the decode worker, a mirror on the prefill worker.

    reserved → writing → ready → decoding → released
          ╰──────────┴───────┴─────────┴──→ failed | expired

Every state but the final ones holds a lease. Progress renews it; when it lapses, the record expires and its
release callbacks run (free the blocks, cancel the transfer, tell the peer). Release is idempotent: releasing
twice, or releasing a record that already failed or expired, runs the callbacks once. Every transport backend
and every path (finish, cancel, failure, lease) ends here, so there is one set of cleanup rules.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


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
        self._sweeper: asyncio.Task | None = None
        self.num_expired = 0

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
        """Run cleanup when the record ends, however it ends (last added, first run)."""
        self._records[request_id].cleanups.append(cleanup)

    def advance(self, request_id: str, state: HandoffState) -> Handoff:
        """Move a live record forward, renewing its lease."""
        record = self._records.get(request_id)
        if record is None:
            raise KeyError(f"request {request_id!r} has no live KV handoff (released, failed or expired)")
        if state is not record.state and state not in NEXT[record.state]:
            raise ValueError(f"handoff {request_id}: {record.state.value} → {state.value} is not a transition")
        record.state = state
        record.renew()
        return record

    def renew(self, request_id: str) -> None:
        """Renew a live record's lease; no-op when the request has none."""
        record = self._records.get(request_id)
        if record is not None:
            record.renew()

    async def end(self, request_id: str, state: HandoffState = HandoffState.RELEASED, reason: str = "") -> bool:
        """End a record (released, failed or expired) and run its cleanups; False if it had already ended."""
        record = self._records.pop(request_id, None)
        if record is None:
            return False
        record.state, record.reason = state, reason
        for cleanup in reversed(record.cleanups):
            try:
                result = cleanup()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # one failed cleanup must not keep the others from running
                log.exception("cleanup of handoff %s failed", request_id)
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

    async def close(self) -> None:
        """Stop expiring and end every live record."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for request_id in list(self._records):
            await self.end(request_id, HandoffState.FAILED, "worker stopping")
