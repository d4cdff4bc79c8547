"""A lane's staging blocks, shared by hash: the blocks a delivery sends from.

A block staged for a hash serves every delivery of that hash while it stays staged: concurrent fetches of one
prefix (a system prompt every request starts with) take one staging block per block of the prefix, not one per
fetch, and copy it out of the store once. A staged block nobody holds stays staged (least recently used first to
go) until a new hash needs its place, so a hot prefix is sent without touching the store at all. Idle staged
blocks give way before never-used ones are touched: the region's resident memory stays what concurrent
deliveries needed at their peak.

`acquire` takes a delivery's entries all at once or none (waiting a little for room), never waiting while it
holds some, so deliveries cannot deadlock. The delivery that finds a hash unstaged claims a fresh block and must
`fill` it (with the tier it came from, or None when the store no longer had it); the others await its `ready`.
`release` gives entries back: a filled one stays staged, an unfilled or failed one frees its block.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(eq=False)
class Staged:
    """One staging block and the hash it holds (or is being filled with)."""

    block_hash: bytes
    block: int
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    refs: int = 0

    @property
    def tier(self) -> str | None:
        """The tier the bytes came from once filled; None while filling or when the store did not have them."""
        return self.ready.result() if self.ready.done() and not self.ready.cancelled() else None


class StagedBlocks:
    """The blocks of one staging region: free, staged and held (refs > 0), or staged and idle (LRU)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._touched = 0  # blocks below this id were handed out at least once
        self._by_hash: dict[bytes, Staged] = {}
        self._idle: OrderedDict[bytes, None] = OrderedDict()  # staged, held by nobody; least recently used first
        self._waiters: list[asyncio.Future] = []
        self.num_shared = 0  # entries handed out already staged (or being filled by another delivery)

    @property
    def num_used(self) -> int:
        """Blocks held by deliveries (0 when nothing leaks; idle staged blocks are not in use)."""
        return self.num_blocks - len(self._free) - len(self._idle)

    @property
    def num_staged(self) -> int:
        return len(self._by_hash)

    async def acquire(self, block_hashes: Sequence[bytes], wait_s: float) -> tuple[list[Staged], list[Staged]]:
        """(entries for the leading hashes, at most num_blocks; the fresh ones among them, for the caller to fill);
        ([], []) when no room freed up within wait_s."""
        hashes = list(block_hashes[:self.num_blocks])
        deadline = time.monotonic() + wait_s
        while self._room(hashes) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return [], []
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except asyncio.TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        entries: list[Staged | None] = [self._by_hash.get(h) for h in hashes]
        for entry in entries:  # take the staged ones first, so making room below cannot evict them
            if entry is not None:
                self._idle.pop(entry.block_hash, None)
                entry.refs += 1
                self.num_shared += 1
        fresh = []
        for i, h in enumerate(hashes):  # a chain's hashes are distinct: each unstaged one gets a block of its own
            if entries[i] is None:
                entries[i] = self._by_hash[h] = Staged(h, self._take(), refs=1)
                fresh.append(entries[i])
        return entries, fresh

    def fill(self, fresh: Sequence[Staged], tiers: Sequence[str]) -> None:
        """The caller's copy is done: fresh[i] holds bytes from tiers[i]; the rest (past len(tiers)) hold nothing
        and are unstaged at once (their blocks free when released). Idempotent: a cancelled delivery fills what
        is left with nothing."""
        for i, entry in enumerate(fresh):
            if entry.ready.done():
                continue
            entry.ready.set_result(tiers[i] if i < len(tiers) else None)
            if entry.tier is None and self._by_hash.get(entry.block_hash) is entry:
                del self._by_hash[entry.block_hash]

    def release(self, entries: Sequence[Staged]) -> None:
        """Give entries back and wake every waiter to look again. Never awaits (safe in a cancelled task)."""
        for entry in entries:
            entry.refs -= 1
            if entry.refs:
                continue
            if entry.tier is not None and self._by_hash.get(entry.block_hash) is entry:
                self._idle[entry.block_hash] = None  # most recently used last
            else:
                if self._by_hash.get(entry.block_hash) is entry:
                    del self._by_hash[entry.block_hash]
                self._free.append(entry.block)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _room(self, hashes: list[bytes]) -> int:
        """Blocks to spare after staging `hashes` (negative: short), counting idle blocks not among them."""
        wanted = set(hashes)
        fresh = sum(1 for h in hashes if h not in self._by_hash)
        evictable = sum(1 for h in self._idle if h not in wanted)
        return len(self._free) + evictable - fresh

    def _take(self) -> int:
        """A block for a new hash: a free one already used, else the least recently used idle one, else one never
        used — so the region's memory is touched only as deep as concurrent deliveries reach, as without sharing.
        (`_free` pops ids upwards from 0 until all were handed out once; a released block goes on top.)"""
        if self._free and (self._free[-1] < self._touched or not self._idle):
            block = self._free.pop()
            self._touched = max(self._touched, block + 1)
            return block
        block_hash, _ = self._idle.popitem(last=False)  # _room made sure it is not one of this chain's
        return self._by_hash.pop(block_hash).block
