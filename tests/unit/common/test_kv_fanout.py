"""Two schedulers' heartbeats fed from one engine's KV events: each index ends up equal to what the pool holds,
whatever the order of the heartbeats, with deltas (not snapshots) in the steady state."""

import asyncio
import random

from kvmesh.services.common.kv_fanout import KVEventsFanout
from kvmesh.v1 import scheduler_pb2


class Pool:
    """The engine's side: a set of held hashes and its changes since the last drain (latest wins)."""

    def __init__(self, max_hashes: int = 1000):
        self.held: dict[bytes, None] = {}
        self.changes: dict[bytes, bool] = {}
        self.max_hashes = max_hashes
        self.snapshots = 0

    def store(self, h: bytes):
        self.held.pop(h, None)
        self.held[h] = None
        self.changes[h] = True

    def remove(self, h: bytes):
        if self.held.pop(h, 0) is None:
            self.changes[h] = False

    async def events(self, full: bool) -> scheduler_pb2.KVEvents:
        changes, self.changes = self.changes, {}
        if full or len(changes) > self.max_hashes:
            self.snapshots += 1
            return scheduler_pb2.KVEvents(stored=list(self.held)[-self.max_hashes:], full=True)
        return scheduler_pb2.KVEvents(stored=[h for h, s in changes.items() if s],
                                      removed=[h for h, s in changes.items() if not s])


def _apply(index: set, events: scheduler_pb2.KVEvents) -> None:
    if events.full:
        index.clear()
    index.update(events.stored)
    index.difference_update(events.removed)


def test_every_scheduler_sees_every_change_whatever_the_order():
    rng = random.Random(0)
    pool = Pool()
    fanout = KVEventsFanout(pool.events, max_hashes=1000)
    subscribers = [fanout.subscriber() for _ in range(3)]
    indexes = [set() for _ in subscribers]
    fulls = [0, 0, 0]

    async def run():
        for step in range(400):
            for _ in range(rng.randrange(4)):
                h = bytes([rng.randrange(40)])
                pool.store(h) if rng.random() < 0.6 else pool.remove(h)
            i = rng.randrange(3)
            events = await subscribers[i](step < 3 and fulls[i] == 0)
            fulls[i] += events.full
            _apply(indexes[i], events)
        for i, sub in enumerate(subscribers):  # a last heartbeat each
            _apply(indexes[i], await sub(False))

    asyncio.run(run())
    assert all(index == set(pool.held) for index in indexes)
    assert fulls == [1, 1, 1]  # the first heartbeat of each; deltas after
    assert pool.snapshots == 1  # the engine was asked for everything once


def test_an_overflow_at_the_source_resyncs_every_scheduler():
    pool = Pool(max_hashes=4)
    fanout = KVEventsFanout(pool.events, max_hashes=4)
    a, b = fanout.subscriber(), fanout.subscriber()
    ia, ib = set(), set()

    async def run():
        _apply(ia, await a(True))
        _apply(ib, await b(True))
        for h in range(10):  # more changes than the source lists: it sends everything instead
            pool.store(bytes([h]))
        first = await a(False)
        second = await b(False)
        assert first.full and second.full
        _apply(ia, first)
        _apply(ib, second)
        pool.remove(bytes([9]))
        _apply(ia, await a(False))
        _apply(ib, await b(False))

    asyncio.run(run())
    assert ia == ib == {bytes([h]) for h in range(6, 9)}  # the 4 most recent, then one removed
