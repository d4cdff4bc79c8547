"""What a Receiver remembers of transfers that ended badly: their errors (tombstones, so a late `wait` gets the
real error) and their fences (a one-sided sender that was mid-write when its transfer failed may still be writing
into the blocks: `Receiver.retire` waits for it to show it stopped)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from kvmesh.transports.errors import TransportError

log = logging.getLogger(__name__)

TOMBSTONES = 1024  # failed transfers remembered, so a late `wait` gets the real error


class Graveyard:
    """Tombstones and fences of one receiver, by transfer id; all methods run on the receiver's loop."""

    def __init__(self) -> None:
        self._tombstones: OrderedDict[str, TransportError] = OrderedDict()
        self._fences: dict[str, asyncio.Future] = {}

    def bury(self, transfer_id: str, error: TransportError, fence: bool) -> None:
        """Remember a failed transfer's error; `fence`: its sender may still be writing into its blocks."""
        if fence:
            self._fences[transfer_id] = asyncio.get_running_loop().create_future()
            while len(self._fences) > TOMBSTONES:  # never retired: forget the oldest
                self._fences.pop(next(iter(self._fences))).cancel()
        self._tombstones[transfer_id] = error
        while len(self._tombstones) > TOMBSTONES:
            self._tombstones.popitem(last=False)

    def unearth(self, transfer_id: str) -> TransportError | None:
        """The error a failed transfer ended with (forgotten once asked), or None."""
        return self._tombstones.pop(transfer_id, None)

    def lift(self, transfer_id: str) -> None:
        """The transfer's sender showed it stopped writing (it aborted, committed, or vanished)."""
        fence = self._fences.pop(transfer_id, None)
        if fence is not None and not fence.done():
            fence.set_result(None)

    async def wait(self, transfer_id: str, fence_s: float) -> None:
        """Return once the transfer's fence is lifted, or after `fence_s` (logged: its sender may be hung)."""
        fence = self._fences.get(transfer_id)
        if fence is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(fence), fence_s)
        except asyncio.TimeoutError:
            log.warning("transfer %s: its sender neither aborted nor closed within %.1f s after the transfer "
                        "failed mid-write; releasing its blocks anyway", transfer_id, fence_s)
        finally:
            self.lift(transfer_id)

    @property
    def num_fences(self) -> int:
        """Failed one-sided transfers whose sender has not yet shown it stopped writing."""
        return len(self._fences)

    def close(self) -> None:
        """Lift every fence (the receiver is closing)."""
        for transfer_id in list(self._fences):
            self.lift(transfer_id)
