"""The scheduler's lease clock: monotonic seconds during which the scheduler was able to watch its workers.

A lease lapses when no heartbeat was read for `lease_s`. But a scheduler that could not run — starved on a loaded
machine, paused by a long garbage collection, stopped and continued — reads no heartbeat either, while the
workers' heartbeats wait in its sockets. Judged by the wall clock, every worker would look dead the moment it
resumes, and the expiry task may run before the heartbeats that prove them alive are read. So leases run on a
clock that leaves such time out: a ticker reads it every `tick_s`, and a gap between two reads longer than two
ticks is time the event loop could not run, so it does not count. A dead worker still lapses after `lease_s` of
time the scheduler watched; a slow scheduler is never taken for dead workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kvmesh.services.common import metrics

log = logging.getLogger(__name__)


class WatchedClock:
    """Monotonic seconds, less the time the scheduler's event loop could not run (see the module's docstring)."""

    def __init__(self, tick_s: float, warn_s: float = 1.0, now: Callable[[], float] = time.monotonic):
        self.tick_s, self.warn_s, self._now = tick_s, warn_s, now
        self._last = now()
        self.unwatched_s = 0.0

    def __call__(self) -> float:
        now = self._now()
        gap = now - self._last
        if gap > 2 * self.tick_s:  # the ticker could not run: the scheduler was not watching
            self.unwatched_s += gap - self.tick_s
            metrics.SCHEDULER_UNWATCHED.inc(gap - self.tick_s)
            if gap > self.warn_s:
                log.warning("the scheduler could not run for %.2fs (a loaded machine, a pause): leases are held "
                            "for that time, so no worker is taken for dead while its heartbeats wait", gap)
        self._last = now
        return now - self.unwatched_s

    async def tick(self) -> None:
        """Read the clock every tick_s, forever (cancelled at stop). The watch starts here: the time the service
        took to start before it is no stall."""
        self._last = max(self._last, self._now())
        while True:
            await asyncio.sleep(self.tick_s)
            self()
