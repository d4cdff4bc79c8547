"""A flexible worker's role and its flips: which of its two sides the scheduler routes to, and the move between.

    flipper = RoleFlipper(ROLE_DECODE, prefill_worker, decode_worker)
    registrations = kit.run(flipper, flipper.current, flexible=True, ...)
    flipper.attach(registrations)       # heartbeat answers with desired_role start a flip

Both sides (the Prefill and the Decode service, over one engine and one KV pool) serve whatever reaches them at
any time, so a route made just before the scheduler noted a flip is still served; the role only says which side
the scheduler routes to. A flip: the scheduler has stopped routing the old role here; wait until the old side's
in-flight work has drained (prefills finished and their transfers committed, or decode streams finished), leave
the registry, and register again in the new role.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kvmesh.services.common import conventions as names
from kvmesh.services.common import metrics, telemetry
from kvmesh.v1 import scheduler_pb2

log = logging.getLogger(__name__)

PREFILL, DECODE = scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE
ROLE_NAMES = {PREFILL: "prefill", DECODE: "decode"}


class BothHandoffs:
    """The two sides' handoff tables, started and closed together (what `WorkerKit.run` drives)."""

    def __init__(self, *tables) -> None:
        self.tables = tables

    def start(self) -> None:
        for table in self.tables:
            table.start()

    async def close(self) -> None:
        for table in self.tables:
            await table.close()

    def __len__(self) -> int:
        return sum(len(table) for table in self.tables)


class RoleFlipper:
    """The role this worker is registered in, and the flip to another one when a heartbeat answer asks."""

    def __init__(self, role: int, prefill, decode, drain_poll_s: float = 0.05, migrate_after_s: float = 0.0) -> None:
        self.role = role
        self.prefill, self.decode = prefill, decode  # PrefillWorker, DecodeWorker over one engine thread
        self.handoffs = BothHandoffs(prefill.handoffs, decode.handoffs)
        self.drain_poll_s = drain_poll_s
        self.migrate_after_s = migrate_after_s  # > 0: decode streams still running then are handed on
        self.registrations: list = []
        self.num_flips = 0
        self._flip: asyncio.Task | None = None

    def current(self) -> int:
        """The role to register in now (read at each registration)."""
        return self.role

    def load(self) -> scheduler_pb2.WorkerLoad:
        """The load of the side the scheduler routes to (the pool is one: its free blocks are both sides')."""
        return self.decode.load() if self.role == DECODE else self.prefill.load()

    def attach(self, registrations: list) -> None:
        """Listen to these registrations' heartbeat answers; each reports arrivals only while decoding."""
        self.registrations = registrations
        for client in registrations:
            client.on_desired_role = self.want
            client.reports_arrivals = self.role == DECODE

    def want(self, role: int) -> None:
        """A heartbeat answer asks for `role`: start a flip unless one runs or the role is ours."""
        if role == self.role or role not in ROLE_NAMES or (self._flip is not None and not self._flip.done()):
            return
        self._flip = asyncio.get_running_loop().create_task(self.flip(role))

    def in_flight(self, role: int) -> int:
        """Work of `role` still running here: prefills (with their open transfers), or decode requests."""
        if role == PREFILL:
            return len(self.prefill.handoffs) + self.prefill.sender.num_open_transfers
        return len(self.decode.handoffs)

    async def flip(self, role: int) -> None:
        """Drain the current role's work, then leave every scheduler and register again as `role`."""
        old, started = self.role, time.perf_counter()
        with telemetry.tracer().start_as_current_span(names.WORKER_ROLE_FLIP) as span:
            span.set_attribute(names.ATTR_ROLE_FROM, ROLE_NAMES[old])
            span.set_attribute(names.ATTR_ROLE_TO, ROLE_NAMES[role])
            log.info("role flip %s -> %s: draining %d in-flight %s requests", ROLE_NAMES[old], ROLE_NAMES[role],
                     self.in_flight(old), ROLE_NAMES[old])
            await self._drain(old, role)
            drained = time.perf_counter()
            for client in self.registrations:
                await client.withdraw()  # Deregister: the old role's entry leaves at once
            self.role = role
            for client in self.registrations:
                client.reports_arrivals = role == DECODE
                client.restore()  # registers again, reading current()
            await asyncio.gather(*(client.registered.wait() for client in self.registrations))
        self.num_flips += 1
        metrics.ROLE_FLIPS.labels(ROLE_NAMES[old], ROLE_NAMES[role]).inc()
        log.info("role flip %s -> %s done: drained in %.2f s, registered in %.2f s", ROLE_NAMES[old],
                 ROLE_NAMES[role], drained - started, time.perf_counter() - drained)

    async def _drain(self, old: int, role: int) -> None:
        """Wait until no work of `old` runs here; decode streams still running after migrate_after_s (when set)
        are ended, and the gateway moves each on to another decode worker."""
        loop = asyncio.get_running_loop()
        hand_on_at = loop.time() + self.migrate_after_s if old == DECODE and self.migrate_after_s > 0 else None
        while self.in_flight(old):
            if hand_on_at is not None and loop.time() >= hand_on_at:
                moved = await self.decode.handoffs.end_all(f"worker flipping to {ROLE_NAMES[role]}")
                log.info("role flip: handed %d decode streams on to other decode workers", moved)
                hand_on_at = None
            await asyncio.sleep(self.drain_poll_s)

    async def close(self) -> None:
        """Stop a flip in progress (the worker is stopping)."""
        if self._flip is not None:
            self._flip.cancel()
            await asyncio.gather(self._flip, return_exceptions=True)
