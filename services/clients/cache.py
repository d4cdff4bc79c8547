"""The cache as its callers (prefill workers, the scheduler) see it: best effort, always with a deadline.

A cache that is down, slow or unknown is a miss, never an error: `lookup` answers 0, `fetch` (delivery through
the KV transports into the caller's blocks) an empty reply, `get` (the streamed bytes) what it got, and `offer`
queues blocks for a background task that puts them (bounded; a full queue drops the offer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np

from kvmesh.services.clients.schedulers import SchedulerSet
from kvmesh.services.common import metrics, telemetry
from kvmesh.services.kv_identity import block_payload_bytes, checksum
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, scheduler_pb2

log = logging.getLogger(__name__)

ADDRESS_TTL_S = 2.0
EMPTY_TTL_S = 0.5
# A Get's deadline grows with what it fetches: the base timeout plus the bytes at this (pessimistic) rate.
MIN_FETCH_BYTES_PER_S = 20e6


class SchedulerCacheAddress:
    """Finds the cache's address through the scheduler's ListWorkers (role CACHE) and remembers it for a few
    seconds ("" when there is none or the scheduler does not answer, remembered for less). Call it to get the
    address; `invalidate()` after a failed call makes the next one ask again."""

    def __init__(self, channels, scheduler: str) -> None:
        self.schedulers = SchedulerSet(channels, scheduler)  # one or more, comma-separated
        self.address, self._expires = "", 0.0
        self._asking: asyncio.Future | None = None

    async def __call__(self) -> str:
        if time.monotonic() < self._expires:
            return self.address
        if self._asking is None:  # callers that come while it asks wait for its answer, not the old one
            self._asking = asyncio.ensure_future(self._ask())
            self._asking.add_done_callback(lambda _: setattr(self, "_asking", None))
        return await asyncio.shield(self._asking)

    async def _ask(self) -> str:
        try:
            reply = await self.schedulers.call(
                "ListWorkers", scheduler_pb2.ListWorkersRequest(role=scheduler_pb2.WORKER_ROLE_CACHE), timeout=1.0)
            address = reply.workers[0].address if reply.workers else ""
        except grpc.aio.AioRpcError as e:
            log.warning("cannot list the cache service at the scheduler: %s", e.code().name)
            address = ""
        if address != self.address:
            log.info("cache service: %s", address or "none registered")
        self.address = address
        self._expires = time.monotonic() + (ADDRESS_TTL_S if address else EMPTY_TTL_S)
        return address

    def invalidate(self) -> None:
        self._expires = 0.0


def scheduler_cache_address(channels, scheduler: str) -> SchedulerCacheAddress:
    """The cache's address as the scheduler knows it (see SchedulerCacheAddress)."""
    return SchedulerCacheAddress(channels, scheduler)


def split_blocks(data: np.ndarray) -> list[bytes]:
    """export_blocks' [L, 2, n, block_nbytes] as n block payloads (each K and V of every layer): a Put's bytes."""
    return [data[:, :, i].tobytes() for i in range(data.shape[2])]


def worker_cache_client(config, channels, layout: common_pb2.KVLayout) -> "CacheClient | None":
    """An engine worker's cache (its `cache` and `cache_timeout_s` settings): the given address, else the one
    registered with its scheduler; None for 'none' or when it has neither."""
    if config.cache == "none" or not (config.cache or config.scheduler):
        return None
    if config.cache:
        async def address() -> str:
            return config.cache
    else:
        address = scheduler_cache_address(channels, config.scheduler)
    return CacheClient(channels, address, layout, config.cache_timeout_s)


class CacheClient:
    """Lookup, fetch and offer blocks of one KV layout at the cache service."""

    def __init__(self, channels, address: Callable[[], Awaitable[str]], layout: common_pb2.KVLayout,
                 timeout_s: float = 2.0, max_pending: int = 64) -> None:
        self.channels, self._address, self.layout = channels, address, layout
        self.timeout_s = timeout_s
        self._offers: asyncio.Queue = asyncio.Queue(maxsize=max_pending)
        self._task: asyncio.Task | None = None
        self.num_dropped_offers = 0

    def _failed(self) -> None:
        """A call failed: the cache may have moved; find it again next time."""
        invalidate = getattr(self._address, "invalidate", None)
        if invalidate is not None:
            invalidate()

    async def _stub(self) -> cache_pb2_grpc.CacheStub | None:
        address = await self._address()
        return cache_pb2_grpc.CacheStub(self.channels.get(address)) if address else None

    async def lookup(self, block_hashes: list[bytes], peek: bool = False) -> int:
        """Leading blocks of the chain the cache holds; 0 when it is unreachable. peek: count and touch nothing."""
        if not block_hashes:
            return 0
        try:
            stub = await self._stub()
            if stub is None:
                return 0
            reply = await stub.Lookup(cache_pb2.LookupRequest(layout=self.layout, block_hashes=block_hashes,
                                                                peek=peek),
                                      timeout=self.timeout_s)
            return reply.num_cached_blocks
        except grpc.aio.AioRpcError as e:
            log.warning("cache lookup failed (computing everything): %s", e.code().name)
            self._failed()
            return 0

    async def get(self, block_hashes: list[bytes]) -> list[bytes]:
        """The leading blocks' bytes, each checked against its checksum; stops at the first missing or bad one."""
        out: list[bytes] = []
        if not block_hashes:
            return out
        try:
            stub = await self._stub()
            if stub is None:
                return out
            nbytes = (block_payload_bytes(self.layout) or 0) * len(block_hashes)
            call = stub.Get(cache_pb2.GetRequest(layout=self.layout, block_hashes=block_hashes),
                            timeout=self.timeout_s + nbytes / MIN_FETCH_BYTES_PER_S)
            async for block in call:
                if block.block_hash != block_hashes[len(out)]:
                    break
                crc = await asyncio.to_thread(checksum, block.data) if len(block.data) > 1 << 20 \
                    else checksum(block.data)
                if crc != block.checksum:
                    break
                out.append(block.data)
        except grpc.aio.AioRpcError as e:
            log.warning("cache get failed after %d blocks: %s", len(out), e.code().name)
            self._failed()
        return out

    async def fetch(self, block_hashes: list[bytes], destination: common_pb2.TransportDescriptor,
                    dst_block_ids: list[int], transfer_id: str) -> cache_pb2.FetchResponse:
        """Have the cache deliver the leading held blocks into dst_block_ids (one per hash) through the transport
        of `destination`, as transfer_id (which the caller has `expect`ed and waits for). Returns its reply
        (num_blocks delivered, 0 when none); a cache that is down, slow or failing is an empty reply."""
        try:
            stub = await self._stub()
            if stub is None:
                return cache_pb2.FetchResponse()
            request = cache_pb2.FetchRequest(layout=self.layout, block_hashes=block_hashes, destination=destination,
                                             destination_blocks=common_pb2.BlockRef(block_ids=dst_block_ids),
                                             transfer_id=transfer_id)
            return await stub.Fetch(request, timeout=self.fetch_timeout(len(block_hashes)))
        except grpc.aio.AioRpcError as e:
            log.warning("cache fetch of %d blocks failed (computing them): %s %s", len(block_hashes),
                        e.code().name, e.details())
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._failed()
            return cache_pb2.FetchResponse()

    def fetch_timeout(self, num_blocks: int) -> float:
        """A fetch's deadline: the base timeout plus its bytes at a pessimistic rate."""
        return self.timeout_s + (block_payload_bytes(self.layout) or 0) * num_blocks / MIN_FETCH_BYTES_PER_S

    # ---- offers: behind the request ----

    def can_offer(self) -> bool:
        return not self._offers.full()

    def offer(self, block_hashes: list[bytes], data: Awaitable) -> bool:
        """Queue blocks for the cache; `data` resolves to their KV as `export_blocks` gives it ([L, 2, n,
        block_nbytes], n ≤ len(block_hashes): the leading hashes' blocks), or None for none. False when the
        queue is full."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._put_loop())
        try:
            self._offers.put_nowait((block_hashes, data))
            return True
        except asyncio.QueueFull:
            self.num_dropped_offers += 1
            metrics.CACHE_OFFERED_BLOCKS.labels(outcome="dropped").inc(len(block_hashes))
            return False

    async def _put_loop(self) -> None:
        while True:
            block_hashes, data = await self._offers.get()
            put = 0
            try:
                exported = await data
                if exported is not None and exported.shape[2]:
                    put = await self._put(block_hashes, await asyncio.to_thread(split_blocks, exported))
            except Exception as e:  # the blocks could not be read out here (put errors are _put's): only a miss
                log.warning("offered blocks could not be read for the cache: %s", e)
            metrics.CACHE_OFFERED_BLOCKS.labels(outcome="put").inc(put)
            metrics.CACHE_OFFERED_BLOCKS.labels(outcome="failed").inc(len(block_hashes) - put)

    async def put_blocks(self, block_hashes: list[bytes], blocks: list[bytes]) -> int:
        """Put blocks now (one per hash), not behind the offer queue; how many the cache took (0: down)."""
        return await self._put(block_hashes, blocks)

    async def _put(self, block_hashes: list[bytes], blocks: list[bytes]) -> int:
        """Put the blocks (one per leading hash); how many the cache took before any failure."""
        stub = await self._stub()
        if stub is None:
            return 0
        put = 0
        with telemetry.tracer().start_as_current_span("cache.put") as span:
            span.set_attribute("kvmesh.kv.bytes", sum(len(b) for b in blocks))
            span.set_attribute("kvmesh.cache.tier", "dram")
            # tail first: the head of the chain ends most recent in the cache's LRU order
            for block_hash, block in reversed(list(zip(block_hashes, blocks))):
                crc = await asyncio.to_thread(checksum, block) if len(block) > 1 << 20 else checksum(block)
                try:
                    await stub.Put(cache_pb2.PutRequest(layout=self.layout, block_hash=block_hash, data=block,
                                                        checksum=crc),
                                   timeout=self.timeout_s + len(block) / MIN_FETCH_BYTES_PER_S)
                except grpc.aio.AioRpcError as e:
                    log.warning("cache put failed after %d of %d blocks: %s", put, len(blocks), e.code().name)
                    self._failed()
                    break
                put += 1
        return put

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
