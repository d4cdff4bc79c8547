"""One worker's KV events for several schedulers: each heartbeat stream gets every change since its own last
heartbeat, though the engine keeps one list of changes (drained by whichever scheduler's heartbeat comes first).

The fan-out drains the engine's changes only (one snapshot at the start, and whenever the engine had more changes
than it lists and sent everything instead) and keeps its own copy of what the pool holds, in the order stored.
Each subscriber holds its pending changes as the engine does — hash -> stored (True) or removed (False), the
latest change winning — so deltas stay exact whatever the order of the heartbeats; a subscriber that asks for
everything (after its registration, or when its scheduler asks for a resync) gets the copy, the `max_hashes`
most recently stored, and so does one whose pending changes outgrow `max_hashes`.
"""

from __future__ import annotations

import asyncio

from kvmesh.v1 import scheduler_pb2


class KVEventsFanout:
    """Splits one `kv_events(full)` source into as many as there are schedulers."""

    def __init__(self, source, max_hashes: int) -> None:
        self._source = source  # async (full: bool) -> scheduler_pb2.KVEvents
        self.max_hashes = max_hashes
        self._held: dict[bytes, None] | None = None  # what the pool holds, oldest stored first; None: not yet read
        self._pending: list[dict[bytes, bool]] = []
        self._stale: set[int] = set()  # subscribers whose next events must be everything
        self._lock = asyncio.Lock()

    def subscriber(self):
        """A new `kv_events(full)` for one scheduler's heartbeats."""
        index = len(self._pending)
        self._pending.append({})
        self._stale.add(index)  # it has seen nothing yet

        async def kv_events(full: bool) -> scheduler_pb2.KVEvents:
            return await self._events(index, full)
        return kv_events

    async def _pull(self) -> bool:
        """Take the source's changes into the copy and every pending list; True when everyone must resync."""
        changes = await self._source(self._held is None)
        if changes.full:
            self._held = dict.fromkeys(changes.stored)
            return True
        for h in changes.removed:
            self._held.pop(h, None)
        for h in changes.stored:
            self._held.pop(h, None)
            self._held[h] = None  # most recent last
        for pending in self._pending:
            pending.update(dict.fromkeys(changes.removed, False))
            pending.update(dict.fromkeys(changes.stored, True))
        return False

    async def _events(self, index: int, full: bool) -> scheduler_pb2.KVEvents:
        async with self._lock:
            if await self._pull():
                self._pending = [{} for _ in self._pending]
                self._stale = set(range(len(self._pending)))
            pending, self._pending[index] = self._pending[index], {}
            if full or index in self._stale or len(pending) > self.max_hashes:
                self._stale.discard(index)
                held = list(self._held)
                return scheduler_pb2.KVEvents(stored=held[-self.max_hashes:] if self.max_hashes > 0 else [],
                                              full=True)
            return scheduler_pb2.KVEvents(stored=[h for h, s in pending.items() if s],
                                          removed=[h for h, s in pending.items() if not s], full=False)
