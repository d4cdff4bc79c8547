"""The block store: blocks keyed by (KV layout, chained block hash), checksummed, counted."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from kvmesh.services.cache.tiers import Tier
from kvmesh.services.common.errors import ChecksumError, InvalidArgumentError

# Checksum larger blocks in a thread so the event loop keeps serving.
OFF_LOOP_BYTES = 1 << 20


def checksum(data: bytes) -> int:
    """xxh3_64 of data: the checksum every block carries."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass
class CacheStats:
    """Counters since start; occupancy is read from the tier."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    rejected_puts: int = 0


class BlockStore:
    """Lookup, put, get and clear over one tier. Blocks of different layouts never meet: the layout (any hashable
    value, e.g. the serialized KVLayout) is part of every key."""

    def __init__(self, tier: Tier) -> None:
        self.tier = tier
        self.stats = CacheStats()

    def lookup(self, layout: object, block_hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the chain are held; counts each held block a hit, each missing one a miss."""
        found = 0
        for block_hash in block_hashes:
            if not self.tier.contains((layout, block_hash)):
                break
            found += 1
        self.stats.hits += found
        self.stats.misses += len(block_hashes) - found
        return found

    async def put(self, layout: object, block_hash: bytes, data: bytes, expected: int) -> tuple[bool, int]:
        """Verify and store one block; (stored, num_evicted). The block becomes visible only after the checksum
        matches, all at once. ChecksumError on a mismatch, InvalidArgumentError for an empty hash."""
        if not block_hash:
            raise InvalidArgumentError("block_hash must not be empty")
        actual = await asyncio.to_thread(checksum, data) if len(data) > OFF_LOOP_BYTES else checksum(data)
        if actual != expected:
            self.stats.rejected_puts += 1
            raise ChecksumError(f"checksum mismatch for block {block_hash.hex()}: "
                                f"got {actual:#018x}, expected {expected:#018x}")
        try:
            stored, evicted = self.tier.put((layout, block_hash), data)
        except Exception:
            self.stats.rejected_puts += 1
            raise
        self.stats.puts += int(stored)
        return stored, evicted

    def get(self, layout: object, block_hashes: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        """(hash, data) of the leading held blocks of the chain, stopping at the first missing one."""
        blocks = []
        for block_hash in block_hashes:
            data = self.tier.get((layout, block_hash))
            if data is None:
                break
            blocks.append((block_hash, data))
        return blocks

    def clear(self) -> int:
        """Drop every block; return how many there were."""
        return self.tier.clear()
