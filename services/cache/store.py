"""The block store: blocks keyed by (KV layout, chained block hash) in a DRAM tier over an optional SSD tier.

* Put is two-phase: the checksum is verified first and the block becomes visible whole, at once. Every new block
  is also queued for the SSD tier (write-through, behind the request): a background writer stages the file under
  a temporary name and renames it into place, so a Put never waits on the disk, DRAM eviction is a plain drop
  (the block lives on below), and a restart finds every block the writer got to.
* Get holds a lease on the blocks it reads: eviction skips leased and pinned blocks, so no file disappears under
  a reader. A hit on the SSD tier is promoted into DRAM.
* Within a chain, blocks are touched tail first, so the head of a prefix is evicted last (see tiers.py).

Thread-safe: the event loop calls lookup/put, a worker thread runs get (file reads), the writer thread publishes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmesh.services.cache.blockfile import CorruptBlockError
from kvmesh.services.cache.tiers import DramTier, SsdTier
from kvmesh.services.common.errors import CapacityError, ChecksumError, InvalidArgumentError
from kvmesh.services.kv_identity import checksum

log = logging.getLogger(__name__)

# Checksum larger blocks in a thread so the event loop keeps serving.
OFF_LOOP_BYTES = 1 << 20
DEFAULT_WRITE_QUEUE = 256

__all__ = ["BlockStore", "CacheStats", "LookupResult", "OFF_LOOP_BYTES"]


@dataclass
class CacheStats:
    """Counters since start; occupancy is read from the tiers."""

    hits: Counter = field(default_factory=Counter)  # by tier name
    misses: int = 0
    puts: int = 0
    rejected_puts: int = 0
    corrupt_blocks: int = 0
    dropped_writes: int = 0


@dataclass(frozen=True)
class LookupResult:
    """Leading blocks of a chain held, split by the tier holding them (DRAM hits first, then SSD)."""

    dram: int = 0
    ssd: int = 0

    @property
    def total(self) -> int:
        return self.dram + self.ssd


def layout_digest(layout: object) -> bytes:
    """16 bytes naming a layout in keys and files (layout: the serialized KVLayout, or any str/bytes)."""
    raw = layout if isinstance(layout, bytes) else str(layout).encode()
    return hashlib.blake2b(raw, digest_size=16).digest()


class BlockStore:
    """Lookup, put, get, pin and clear over a DRAM tier and an optional SSD tier."""

    def __init__(self, dram: DramTier, ssd: SsdTier | None = None, write_queue: int = DEFAULT_WRITE_QUEUE) -> None:
        self.dram, self.ssd = dram, ssd
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._pins: Counter = Counter()
        self._leases: Counter = Counter()
        self._pending: dict[tuple, bytes] = {}  # queued for the SSD tier, not yet published
        self._generation = 0  # bumped by clear(): queued writes of an older generation are discarded
        self._writes: queue.Queue = queue.Queue(maxsize=write_queue)
        self._writer = None
        if ssd is not None:
            ssd.recover()
            self._writer = threading.Thread(target=self._write_loop, name="cache-ssd-writer", daemon=True)
            self._writer.start()

    @property
    def tier(self) -> DramTier:
        """The top tier (kept for callers that knew only one)."""
        return self.dram

    @property
    def tiers(self) -> list:
        return [t for t in (self.dram, self.ssd) if t is not None]

    def _protected(self, key) -> bool:
        return self._pins[key] > 0 or self._leases[key] > 0

    def _where(self, key) -> str | None:
        if self.dram.contains(key):
            return "dram"
        if key in self._pending or (self.ssd is not None and self.ssd.contains(key)):
            return "ssd"
        return None

    def _touch_chain(self, keys: list) -> None:
        for key in reversed(keys):  # the head ends most recent
            self.dram.touch(key)
            if self.ssd is not None:
                self.ssd.touch(key)

    # ---- the operations ----

    def lookup(self, layout: object, block_hashes: Sequence[bytes], peek: bool = False) -> LookupResult:
        """The leading blocks of the chain held, per tier; counts each a hit (by tier) or a miss and marks the
        hits used, unless peek."""
        digest, counts, keys = layout_digest(layout), Counter(), []
        with self._lock:
            for block_hash in block_hashes:
                key = (digest, block_hash)
                tier = self._where(key)
                if tier is None:
                    break
                counts[tier] += 1
                keys.append(key)
            if not peek:
                self._touch_chain(keys)
                self.stats.hits.update(counts)
                self.stats.misses += len(block_hashes) - len(keys)
        return LookupResult(counts["dram"], counts["ssd"])

    async def put(self, layout: object, block_hash: bytes, data: bytes, expected: int) -> tuple[bool, int]:
        """Verify and store one block; (stored, num_evicted). ChecksumError on a mismatch (nothing stored),
        InvalidArgumentError for an empty hash or block."""
        if not block_hash or not data:
            raise InvalidArgumentError("block_hash and data must not be empty")
        actual = await asyncio.to_thread(checksum, data) if len(data) > OFF_LOOP_BYTES else checksum(data)
        if actual != expected:
            self.stats.rejected_puts += 1
            raise ChecksumError(f"checksum mismatch for block {block_hash.hex()}: "
                                f"got {actual:#018x}, expected {expected:#018x}")
        return self.put_verified(layout, block_hash, bytes(data), actual)

    def put_verified(self, layout: object, block_hash: bytes, data: bytes, crc: int) -> tuple[bool, int]:
        """Store a block whose checksum crc is known to hold; (stored, num_evicted)."""
        key = (layout_digest(layout), block_hash)
        with self._lock:
            new = self._where(key) is None
            evicted = self.dram.put(key, data, len(data), self._protected)
            if evicted is None and (self.ssd is None or len(data) > self.ssd.capacity_bytes):
                self.stats.rejected_puts += 1
                if len(data) > self.dram.capacity_bytes:
                    raise CapacityError(f"block of {len(data)} bytes exceeds every tier's budget")
                return False, 0  # every block in the way is pinned or being read
            if new:
                self.stats.puts += 1
                self._queue_write(key, data, crc)
            return new, len(evicted or ())

    def _queue_write(self, key, data: bytes, crc: int) -> None:
        if self.ssd is None or len(data) > self.ssd.capacity_bytes:
            return
        try:
            self._writes.put_nowait((self._generation, key, data, crc))
            self._pending[key] = data
        except queue.Full:  # the disk is behind: this block lives in DRAM only
            self.stats.dropped_writes += 1

    def get(self, layout: object, block_hashes: Sequence[bytes],
            sink: Callable[[int, bytes], bool] | None = None) -> list[tuple[bytes, bytes, str]]:
        """(hash, data, tier) of the leading held blocks of the chain, stopping at the first missing or corrupt
        one. Reads files: call it off the event loop. SSD hits are promoted into DRAM.

        sink(i, data), when given, is called for each block while the read lease is still held (e.g. to copy it
        into a staging buffer); returning False stops the chain there."""
        digest = layout_digest(layout)
        keys = [(digest, h) for h in block_hashes]
        with self._lock:
            leased = []
            for key in keys:
                if self._where(key) is None:
                    break
                self._leases[key] += 1
                leased.append(key)
        out = []
        try:
            for key in leased:
                found = self._read(key)
                if found is None or (sink is not None and not sink(len(out), found[0])):
                    break
                out.append((key[1], *found))
        finally:
            with self._lock:
                for key in leased:
                    self._leases[key] -= 1
                    if not self._leases[key]:
                        del self._leases[key]
                self._touch_chain([(digest, h) for h, _, _ in out])
        return out

    def _read(self, key) -> tuple[bytes, str] | None:
        with self._lock:
            data = self.dram.read(key) or self._pending.get(key)
            if data is not None:
                return data, "dram" if self.dram.contains(key) else "ssd"
        try:
            data = self.ssd.read(key)
        except (CorruptBlockError, OSError) as e:
            log.warning("dropping SSD block %s: %s", key[1].hex(), e)
            with self._lock:
                self.stats.corrupt_blocks += 1
                self.ssd.remove(key)
            return None
        with self._lock:  # promote on hit
            self.dram.put(key, data, len(data), self._protected)
        return data, "ssd"

    def pin(self, layout: object, block_hashes: Sequence[bytes]) -> int:
        """Keep these blocks from eviction (counted: pin twice, unpin twice); returns how many are held."""
        digest = layout_digest(layout)
        with self._lock:
            held = [(digest, h) for h in block_hashes if self._where((digest, h)) is not None]
            self._pins.update(held)
        return len(held)

    def unpin(self, layout: object, block_hashes: Sequence[bytes]) -> int:
        """Undo one pin of each block; returns how many pins were dropped."""
        digest, dropped = layout_digest(layout), 0
        with self._lock:
            for h in block_hashes:
                key = (digest, h)
                if self._pins[key] > 0:
                    self._pins[key] -= 1
                    dropped += 1
                if not self._pins[key]:
                    del self._pins[key]
        return dropped

    def clear(self) -> int:
        """Drop every block of every tier (pins too); return how many distinct blocks there were."""
        with self._lock:
            keys = set(self.dram) | set(self._pending) | (set(self.ssd) if self.ssd else set())
            self._generation += 1
            self._pins.clear()
            self._pending.clear()
            for tier in self.tiers:
                tier.clear()
        return len(keys)

    # ---- the SSD writer ----

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                self._write_one(*item)
            except Exception:  # a full or failing disk costs the SSD copy, never the service
                log.exception("SSD write failed")
            finally:
                self._writes.task_done()

    def _write_one(self, generation: int, key, data: bytes, crc: int) -> None:
        with self._lock:
            if generation != self._generation or self.ssd.contains(key):
                self._pending.pop(key, None)
                return
        tmp = self.ssd.stage(key, data, crc)
        with self._lock:
            self._pending.pop(key, None)
            if generation != self._generation or self.ssd.put(key, tmp, len(data), self._protected) is None:
                tmp.unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until every queued SSD write is done (tests, shutdown)."""
        if self._writer is not None:
            self._writes.join()

    def close(self) -> None:
        """Finish queued SSD writes and stop the writer."""
        if self._writer is not None and self._writer.is_alive():
            self._writes.put(None)
            self._writer.join(30)
