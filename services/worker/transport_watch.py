"""Readiness that stays true: a decode worker re-checks its transports while it runs, as it checked them at start
(readiness.py) — one real block moved through each backend into its own pool, between two blocks borrowed from
the pool for the moment — every `--transport-check-s`. A backend that fails (its shared-memory segment unlinked
from /dev/shm, a UCX worker error, its own port unreachable) turns the worker NOT_SERVING and takes it out of every
scheduler's registry, so no new request is routed to a pool peers cannot write into; a later check that passes
makes it SERVING and registers it again. A pool with no two free blocks skips a round (it is busy, not broken)."""

from __future__ import annotations

import asyncio
import logging

from kvmesh.services.engine.errors import OutOfBlocksError
from kvmesh.services.worker.readiness import TransportNotReady, self_transfer

log = logging.getLogger(__name__)

CHECK_ID = "kvmesh-transport-check"  # the reservation the check borrows its two blocks under
CHECK_TIMEOUT_S = 10.0


class TransportWatch:
    """Re-checks a decode worker's transports every interval_s and follows the result with its health and its
    registrations (RegistrationClient per scheduler)."""

    def __init__(self, server, engine_thread, region, layout, receiver, descriptor, interval_s: float,
                 registrations: list) -> None:
        self.server, self.et, self.region, self.layout = server, engine_thread, region, layout
        self.receiver, self.descriptor = receiver, descriptor  # descriptor(): the receiver's, as peers get it
        self.interval_s = interval_s
        self.registrations = registrations
        self.serving = True
        self.num_checks = 0

    async def run(self, _server=None) -> None:
        """Background task: check, then follow the result, forever."""
        while True:
            await asyncio.sleep(self.interval_s)
            failure = await self.check()
            if failure is not None and self.serving:
                log.error("transport lost: %s; NOT_SERVING and leaving the schedulers until a check passes", failure)
                await self.server.set_serving(False)
                await asyncio.gather(*(r.withdraw() for r in self.registrations))
                self.serving = False
            elif failure is None and not self.serving:
                log.warning("transports pass their check again: SERVING and registering again")
                await self.server.set_serving(True)
                for registration in self.registrations:
                    registration.restore()
                self.serving = True

    async def check(self) -> str | None:
        """One round: None when every backend moved the block intact (or the pool had no room to check), else why
        one did not."""
        try:
            blocks = await self.et.call(self.et.engine.reserve, CHECK_ID, 2 * self.layout.block_size)
        except OutOfBlocksError:
            return None
        try:
            self.num_checks += 1
            await self_transfer(self.region, self.layout, self.receiver, self.descriptor(), self.receiver.backends,
                                CHECK_TIMEOUT_S, blocks=(blocks[0], blocks[1]))
            return None
        except TransportNotReady as e:
            return str(e)
        finally:
            await self.et.call(self.et.engine.release, CHECK_ID)
