"""Failure reports to the scheduler: a caller whose call to a worker could not reach it says so, so that the
scheduler's circuit breaker takes the worker out of routing at once rather than when its lease lapses.

Best effort: a report is sent in the background with a short deadline; a report that fails is logged at debug
level and forgotten, and never delays or fails the request that saw the failure.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from kvmesh.services.common.registration import scheduler_addresses
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 0.5


class FailureReporter:
    """Sends ReportFailure calls through `channels` (a ChannelCache) to every scheduler of `scheduler` (one
    address, or several comma-separated: a scheduler that does not know the worker id ignores the report)."""

    def __init__(self, channels, scheduler: str, reporter: str = "", timeout_s: float = REPORT_TIMEOUT_S) -> None:
        self.channels, self.reporter = channels, reporter
        self.schedulers = scheduler_addresses(scheduler)
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task] = set()

    def report(self, worker_id: str, address: str, role: int, error: grpc.aio.AioRpcError) -> None:
        """Report in the background that a call to the worker failed with `error`; returns at once."""
        if not self.schedulers or not (worker_id or address):
            return
        request = scheduler_pb2.ReportFailureRequest(
            worker_id=worker_id, address=address, role=role, code=error.code().value[0],
            message=(error.details() or "")[:200], reporter=self.reporter)
        for scheduler in self.schedulers:
            task = asyncio.ensure_future(self._send(scheduler, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, scheduler: str, request: scheduler_pb2.ReportFailureRequest) -> None:
        stub = scheduler_pb2_grpc.SchedulerStub(self.channels.get(scheduler))
        try:
            await stub.ReportFailure(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:  # the report is a hint; the request's own error stands
            log.debug("failure report about %s not delivered: %s", request.worker_id or request.address, e.code())

    async def close(self) -> None:
        """Cancel the reports still in flight."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
