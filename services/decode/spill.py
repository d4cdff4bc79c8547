"""Borrowed KV memory (`--kv-spill cache`): the cache service as the decode worker's swap space.

The engine (engine/swap.py) decides what to spill and when to page back, on its own thread, and says so in two
events; this module moves the bytes, on the event loop, never in the engine's way:

* `SpillOut` (a victim's oldest blocks, already copied out and freed in the pool): put into the cache under fresh
  random 16-byte keys, one per block. Nobody else can address them (no chained hash leads there), so they are
  private without any new cache state: plain evictable entries, least recently used first. Why not owned entries
  freed with the request: the cache has no delete, and a worker that dies could not free them anyway; an entry
  nobody can read is garbage its LRU already collects, within its byte budget. A request that ends forgets its
  keys here and its page-back is cancelled (its transfer retired before its blocks are freed).
* `PageIn` (blocks allocated again for the spilled positions): once that request's puts are done, the cache
  delivers the blocks into them through the KV transports (as it delivers a prefix hit), checksums verified, while
  the batch steps on; then the engine resumes the sequence. Anything short of every block (cache down, an entry
  evicted, a damaged transfer) is a miss: the engine recomputes the sequence from its tokens, never an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from kvmesh.services.clients.cache import split_blocks
from kvmesh.services.common import metrics
from kvmesh.services.engine.swap import PageIn, SpillOut
from kvmesh.services.worker.cache_fetch import fetch_into

log = logging.getLogger(__name__)
KEY_BYTES = 16


class Spiller:
    """Puts spilled blocks into the cache and delivers them back, for the requests this worker decodes."""

    def __init__(self, engine_thread, cache, receiver, loop: asyncio.AbstractEventLoop):
        self.et, self.cache, self.receiver, self._loop = engine_thread, cache, receiver, loop
        self._keys: dict[tuple[str, int], bytes] = {}  # (request id, block position) -> its key in the cache
        self._puts: dict[str, list[asyncio.Task]] = {}
        self._page_backs: dict[str, asyncio.Task] = {}
        self._live: set[str] = set()
        self.swapped: set[str] = set()  # requests with blocks out: alive, though they make no tokens

    def attach(self) -> None:
        """Have the engine spill instead of preempt (before its thread starts)."""
        self.et.engine.enable_spill(self._emit)

    def track(self, request_id: str, handoffs) -> None:
        """A request joins this worker's batch (call before the engine sees it): its spills are kept from now until
        its handoff ends, when `forget` runs before the request's blocks are freed (a release cleanup added
        earlier runs later)."""
        self._live.add(request_id)
        handoffs.on_release(request_id, lambda: self.forget(request_id))

    async def forget(self, request_id: str) -> None:
        """A request ended: cancel its page-back (its transfer retired: nothing writes into its blocks after this)
        and its puts, and drop its keys (the entries already put stay, unreadable, until the cache evicts them)."""
        self._live.discard(request_id)
        self.swapped.discard(request_id)
        tasks = [*self._puts.pop(request_id, []), *filter(None, [self._page_backs.pop(request_id, None)])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for key in [k for k in self._keys if k[0] == request_id]:
            del self._keys[key]

    def _emit(self, event) -> None:
        """Engine thread: hand the event to the loop (in order)."""
        self._loop.call_soon_threadsafe(self._on_event, event)

    def _on_event(self, event) -> None:
        rid = event.request_id
        if rid not in self._live:  # ended meanwhile: its blocks are (being) freed with it
            return
        if isinstance(event, SpillOut):
            keys = [os.urandom(KEY_BYTES) for _ in event.positions]
            self._keys.update(zip(((rid, p) for p in event.positions), keys))
            self.swapped.add(rid)
            self._puts.setdefault(rid, []).append(asyncio.ensure_future(self._put(keys, event)))
        elif isinstance(event, PageIn):
            self._page_backs[rid] = asyncio.ensure_future(self._page_back(event))

    async def _put(self, keys: list[bytes], event: SpillOut) -> bool:
        started = time.perf_counter()
        blocks = await asyncio.to_thread(split_blocks, event.data)
        put = await self.cache.put_blocks(keys, blocks) if self.cache is not None else 0
        metrics.KV_BLOCKS_SPILLED.inc(put)
        metrics.KV_SPILL_SECONDS.observe(time.perf_counter() - started)
        if put < len(keys):
            log.warning("request %s: %d of %d spilled blocks reached the cache; it will be recomputed",
                        event.request_id, put, len(keys))
        return put == len(keys)

    async def _page_back(self, event: PageIn) -> None:
        rid, started = event.request_id, time.perf_counter()
        puts = self._puts.pop(rid, [])
        ok = all(r is True for r in await asyncio.gather(*puts, return_exceptions=True))
        keys = [self._keys.pop((rid, p), None) for p in event.positions]
        if ok and None not in keys:
            reply = await fetch_into(self.cache, self.receiver, f"{rid}/page-back", keys, list(event.block_ids))
            ok = reply.num_blocks == len(keys)
        else:
            ok = False
        outcome = "paged_back" if ok else "recomputed"
        metrics.KV_BLOCKS_PAGED_BACK.labels(outcome=outcome).inc(len(keys))
        metrics.KV_PAGE_BACK_SECONDS.observe(time.perf_counter() - started)
        if not ok:
            log.warning("request %s: its %d spilled blocks did not come back from the cache; recomputing them",
                        rid, len(keys))
        self.swapped.discard(rid)
        self._page_backs.pop(rid, None)
        await self.et.call(self.et.engine.paged_back, rid, ok)
