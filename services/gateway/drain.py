"""The gateway's drain on SIGTERM: refuse new requests, give those in flight the grace period to finish, then end
each one still running with an explicit UNAVAILABLE (an SSE error event, an HTTP 503, a gRPC status) rather than
letting the process exit under it, which would cut its connection with no word of why.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from kvmesh.services.common.errors import UnavailableError

SHUTTING_DOWN = "the gateway is shutting down: send the request again (to another gateway)"


class LiveRequest:
    """One request in flight: the decode call to cancel, and whether the drain ended it."""

    def __init__(self) -> None:
        self.call = None  # the decode worker's stream, once opened
        self.cut = False

    def check(self) -> None:
        """Raise the drain's UNAVAILABLE if the drain has ended this request."""
        if self.cut:
            raise UnavailableError(SHUTTING_DOWN)

    def end(self) -> None:
        """End the request for the drain: its decode call is cancelled, and `check()` raises from now on."""
        self.cut = True
        if self.call is not None:
            self.call.cancel()


class Drain:
    """The requests in flight at one gateway, and the drain that ends them."""

    def __init__(self) -> None:
        self.draining = False
        self._live: set[LiveRequest] = set()
        self._idle: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._live)

    def check_open(self) -> None:
        """Refuse new work while draining: UNAVAILABLE, which clients and balancers retry elsewhere."""
        if self.draining:
            raise UnavailableError(SHUTTING_DOWN)

    @contextlib.contextmanager
    def track(self) -> Iterator[LiveRequest]:
        """Count one request as in flight for as long as the block runs."""
        self.check_open()
        live = LiveRequest()
        self._live.add(live)
        try:
            yield live
        finally:
            self._live.discard(live)
            if not self._live and self._idle is not None:
                self._idle.set()

    async def drain(self, grace_s: float, settle_s: float = 1.0) -> int:
        """Refuse new requests; wait up to grace_s for those in flight, then end each one left (the client gets
        the error) and wait up to settle_s for them to report it. Returns how many were ended."""
        self.draining = True
        left = await self._wait_idle(grace_s)
        for live in left:
            live.end()
        await self._wait_idle(settle_s)
        return len(left)

    async def _wait_idle(self, timeout_s: float) -> list[LiveRequest]:
        """Wait until no request is in flight or timeout_s passed; the requests still in flight."""
        if self._live:
            self._idle = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        return list(self._live)
