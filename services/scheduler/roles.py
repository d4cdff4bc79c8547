"""Role flips of flexible workers (`--role auto`): which worker the scheduler wants in which role.

A flip is keyed by the worker's address, which stays the same while the worker drains its old role, leaves the
registry and registers again in the new one (with a new worker id). From the request until that registration:
the worker's heartbeats answer the wanted role, and routing of its old role skips it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kvmesh.services.common.errors import InvalidArgumentError

log = logging.getLogger(__name__)

FLIPPABLE = (1, 2)  # Role.PREFILL, Role.DECODE (the registry's numbers; this module does not import it)


@dataclass(frozen=True)
class PendingFlip:
    """A role a flexible worker was asked to take, why, and when (monotonic seconds)."""

    role: int
    reason: str
    since: float


class RoleFlips:
    """The pending flips, by worker address. Synchronous and quick, like the registry that holds it."""

    def __init__(self) -> None:
        self._pending: dict[str, PendingFlip] = {}

    def request(self, worker, role: int, reason: str = "") -> bool:
        """Ask `worker` (a registry Worker, or None) to take `role`; False when it is not a flexible worker or
        already has the role (a pending flip away from that role is then withdrawn)."""
        if role not in FLIPPABLE:
            raise InvalidArgumentError(f"a worker can be asked to take PREFILL or DECODE, not role {int(role)}")
        if worker is None or not worker.spec.flexible:
            return False
        if worker.spec.role == role:
            self._pending.pop(worker.spec.address, None)
            return False
        self._pending[worker.spec.address] = PendingFlip(int(role), reason, time.monotonic())
        log.info("asked %s (%s) to flip %d -> %d: %s", worker.spec.address, worker.worker_id, int(worker.spec.role),
                 int(role), reason or "no reason given")
        return True

    def desired(self, worker) -> int | None:
        """The role `worker` is asked to take, or None when it keeps its own."""
        flip = self._pending.get(worker.spec.address)
        if flip is None or not worker.spec.flexible or flip.role == worker.spec.role:
            return None
        return flip.role

    def leaving(self, worker) -> bool:
        """Whether `worker` is draining its role for another one (no new work of its role goes to it)."""
        return self.desired(worker) is not None

    def registered(self, worker) -> PendingFlip | None:
        """A worker (re)registered: the flip it completes, if any, which is no longer pending."""
        flip = self._pending.get(worker.spec.address)
        if flip is not None and flip.role == worker.spec.role:
            return self._pending.pop(worker.spec.address)
        return None

    def forget(self, address: str) -> None:
        """No worker is left at `address` (its lease lapsed): drop its pending flip."""
        self._pending.pop(address, None)
