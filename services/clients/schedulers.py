"""One or more schedulers, as the gateway and the workers see them: no single point of failure.

Schedulers hold soft state only (a registry rebuilt from heartbeats within one lease, routed-request counts), so
any of them can route any request: every worker registers and heartbeats with each (registration.py), and a
caller sends each call to the scheduler that last answered, moving on to the next when that one is unreachable
(UNAVAILABLE) or does not answer within `failover_s` — a SIGKILLed scheduler costs a refused connection, a frozen
one at most `failover_s`, and the last scheduler tried gets what is left of the call's deadline.

    schedulers = SchedulerSet(channels, "10.0.0.1:50050,10.0.0.2:50050")
    route = await schedulers.call("Route", request, timeout=5.0)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import grpc

from kvmesh.services.common.registration import scheduler_addresses
from kvmesh.v1 import scheduler_pb2_grpc

log = logging.getLogger(__name__)

#: The longest a call waits on one scheduler before trying the next, when there is a next.
FAILOVER_S = 1.0
#: What moves a call on to the next scheduler: that one is gone or frozen; anything else is its answer.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class SchedulerSet:
    """Calls to whichever of several schedulers answers, preferring the one that answered last."""

    def __init__(self, channels, addresses: str | Sequence[str], failover_s: float = FAILOVER_S) -> None:
        self.channels = channels  # a ChannelCache
        self.addresses = scheduler_addresses(addresses)
        self.failover_s = failover_s
        self._current = 0

    def __bool__(self) -> bool:
        return bool(self.addresses)

    @property
    def current(self) -> str:
        """The scheduler the next call goes to first."""
        return self.addresses[self._current]

    def stub(self, address: str | None = None) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self.channels.get(address or self.current))

    async def call(self, method: str, request, timeout: float):
        """`Scheduler.<method>(request)` on the first scheduler that answers, within `timeout` seconds in all;
        raises the last scheduler's grpc.aio.AioRpcError when none does, or the first answer that is an error of
        the call itself (RESOURCE_EXHAUSTED, INVALID_ARGUMENT, ...)."""
        deadline = time.monotonic() + timeout
        n, start = len(self.addresses), self._current  # read once: concurrent calls move it
        for i in range(n):
            index = (start + i) % n
            address, last = self.addresses[index], i == n - 1
            remaining = max(0.0, deadline - time.monotonic())
            try:
                reply = await getattr(self.stub(address), method)(
                    request, timeout=remaining if last else min(remaining, self.failover_s))
            except grpc.aio.AioRpcError as e:
                if e.code() not in FAILOVER_CODES:
                    raise
                if n > 1:  # the next call starts at the next scheduler, even when this one has no time left
                    self._current = (index + 1) % n
                if last or deadline - time.monotonic() <= 0:
                    raise
                log.warning("scheduler %s did not answer %s (%s); trying %s", address, method, e.code().name,
                            self.addresses[(index + 1) % n])
                continue
            self._current = index
            return reply
        raise AssertionError("unreachable: the last scheduler's failure is raised")
