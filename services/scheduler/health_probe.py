"""Health checks that feed the circuit breakers: a reported failure is verified at once, an open breaker is
re-checked until its cool-down passes.

A report says "my call failed"; the check says whether the worker answers at all. A worker that does not answer
(dead, frozen, unreachable) gets a second failure at once, which opens its breaker within one check's deadline of
the first report; one that answers SERVING ends the run of failures, so one spurious report opens nothing. While a
breaker is open a failed check restarts its cool-down, so a dead worker never draws the half-open probe route.
Each check opens its own channel: a worker restarted on the same address must not meet a channel cached in
reconnect backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from kvmesh.services.common.healthcheck import check_async
from kvmesh.services.scheduler.breaker import BreakerState
from kvmesh.services.scheduler.registry import Registry, Worker

log = logging.getLogger(__name__)

HealthCheck = Callable[[str, str, float], Awaitable[bool]]


class HealthProber:
    """Runs at most one health check per worker at a time and feeds its result to the worker's breaker."""

    def __init__(self, registry: Registry, timeout_s: float = 0.5, check: HealthCheck = check_async) -> None:
        self.registry = registry
        self.timeout_s = timeout_s
        self._check = check
        self._pending: dict[str, asyncio.Task] = {}

    def check_soon(self, worker: Worker) -> None:
        """Start a health check of worker unless one is already running."""
        if worker.worker_id not in self._pending:
            task = asyncio.ensure_future(self._run(worker))
            self._pending[worker.worker_id] = task
            task.add_done_callback(lambda _t, wid=worker.worker_id: self._pending.pop(wid, None))

    async def _run(self, worker: Worker) -> None:
        ok = await self._check(worker.spec.address, "", self.timeout_s)
        if ok:
            self.registry.record_healthy(worker)
            return
        before = self.registry.breaker_state(worker)
        self.registry.record_failure(worker)
        if before is not BreakerState.OPEN and self.registry.breaker_state(worker) is BreakerState.OPEN:
            log.warning("breaker opened: %s at %s fails its health check", worker.worker_id, worker.spec.address)

    async def watch_open(self, interval_s: float) -> None:
        """Every interval_s, re-check the workers whose breaker is open, forever (cancelled at stop)."""
        while True:
            await asyncio.sleep(interval_s)
            for worker in self.registry.workers():
                if self.registry.breaker_state(worker) is BreakerState.OPEN:
                    self.check_soon(worker)

    async def close(self) -> None:
        """Cancel the checks in flight."""
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
