"""Swap-style preemption with a remote store as the swap space: spill KV blocks out instead of recomputing them.

When a running sequence needs blocks and none is free, `Swap.spill` takes them from a victim instead of freeing
the victim's whole block table: the victim's oldest full, computed blocks are copied out (`export`, on the engine
thread, a memcpy) and freed, their places in its block table set to -1 (`Sequence.spilled` lists them), and a
`SpillOut` event hands the copy to whoever stores it (the decode worker puts it into the cache service). The last
block a sequence holds is never spilled: its next token is written there. Victims, as vLLM chooses them: sequences
already swapped out first (they are stopped anyway), then the running one that arrived last (it may be the one
asking).

Attention reads every block of a sequence at each step, so a sequence with spilled blocks does not run: it waits
in `swapped` (arrival order). `page_back` gives the oldest its blocks back as soon as they are free (one block of
headroom kept for a running batch) and emits `PageIn`; the store delivers the KV into them off the engine thread
while the batch steps on, and `paged_back(seq, ok)` resumes the sequence (ok) or, when the delivery failed (store
gone, blocks evicted), falls back to recompute: every block freed, the sequence queued to prefill its tokens again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvmesh.services.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SpillOut:
    """Blocks of a sequence copied out: `data` (uint8 [L, 2, len(positions), block_nbytes]) to store under the
    sequence's `positions`."""

    request_id: str
    positions: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class PageIn:
    """Blocks allocated for a sequence's spilled `positions`: deliver their stored KV into `block_ids`."""

    request_id: str
    positions: tuple[int, ...]
    block_ids: tuple[int, ...]


class Swap:
    """The sequences swapped out of one scheduler, and the two moves (spill, page back) between pool and store."""

    def __init__(self, export: Callable[[list[int]], np.ndarray], emit: Callable[[object], None],
                 block_size: int):
        self.export, self.emit, self.block_size = export, emit, block_size
        self.swapped: list[Sequence] = []  # spilled or paging back, in arrival order
        self.num_spilled_blocks = 0
        self.num_paged_back_blocks = 0
        self.num_page_back_failures = 0

    def has_work(self, scheduler) -> bool:
        """A swapped sequence could be paged back now, or room made for it (the engine should step)."""
        head = self._head()
        if head is None:
            return False
        return scheduler.allocator.can_allocate(self._need(scheduler, head)) or (
            not scheduler.running and any(self._held(s) for s in self.swapped if s is not head))

    def spillable(self, seq: Sequence) -> list[int]:
        """Positions of a sequence's blocks that may go: full, computed, held, never its last block."""
        last = min(seq.num_computed_tokens // self.block_size, len(seq.block_table) - 1)
        return [i for i in range(max(last, 0)) if seq.block_table[i] >= 0]

    def spill(self, scheduler, asking: Sequence, need: int, busy=()) -> Sequence | None:
        """Free at least `need` blocks by spilling a victim's oldest blocks; the victim, or None when no sequence
        has a block to spill (the caller preempts as before). `busy`: sequences this step already runs (never
        victims: their blocks are about to be read)."""
        for victim in [*reversed(self.swapped), *reversed(scheduler.running)]:
            if victim.status is SequenceStatus.PAGING_BACK or victim in busy or not self.spillable(victim):
                continue
            before = scheduler.allocator.num_free_blocks
            positions = []
            for i in self.spillable(victim):
                if scheduler.allocator.num_free_blocks - before >= need and victim is not asking:
                    break
                positions.append(i)
                scheduler.allocator.free([victim.block_table[i]])  # one at a time: shared blocks free nothing
            self._spill_out(victim, positions)
            if victim.status is SequenceStatus.RUNNING:
                scheduler.running.remove(victim)
                victim.status = SequenceStatus.SPILLED
                self._enqueue(victim)
            return victim
        return None

    def _spill_out(self, seq: Sequence, positions: list[int]) -> None:
        block_ids = [seq.block_table[i] for i in positions]
        data = self.export(block_ids)  # the blocks are free but not reused before this returns
        for i in positions:
            seq.block_table[i] = -1
        seq.spilled = sorted(seq.spilled + positions)
        self.num_spilled_blocks += len(positions)
        self.emit(SpillOut(seq.request_id, tuple(positions), data))

    def page_back(self, scheduler) -> None:
        """Give the oldest swapped sequence its blocks back when they are free, and ask for its KV (PageIn).

        With nothing running, nothing else will free blocks: the other swapped sequences give up every block they
        hold (last ones too: they are stopped, and their KV comes back with them), newest first, so the oldest can
        run."""
        head = self._head()
        if head is None:
            return
        need, allocator = self._need(scheduler, head), scheduler.allocator
        for victim in reversed(self.swapped):
            if allocator.can_allocate(need) or scheduler.running or victim is head:
                break
            positions = self._held(victim)
            if positions:
                allocator.free([victim.block_table[i] for i in positions])
                self._spill_out(victim, positions)
        if not allocator.can_allocate(need):
            return
        block_ids = allocator.allocate(len(head.spilled))
        for i, b in zip(head.spilled, block_ids):
            head.block_table[i] = b
        head.status = SequenceStatus.PAGING_BACK
        self.emit(PageIn(head.request_id, tuple(head.spilled), tuple(block_ids)))

    def _need(self, scheduler, head: Sequence) -> int:
        """Free blocks a page-back waits for: the spilled ones, plus one of headroom for a running batch."""
        return len(head.spilled) + (1 if scheduler.running else 0)

    @staticmethod
    def _held(seq: Sequence) -> list[int]:
        return [i for i, b in enumerate(seq.block_table) if b >= 0]

    def paged_back(self, scheduler, seq: Sequence, ok: bool) -> None:
        """A page-back ended: resume the sequence with its KV back (ok), or recompute it from its tokens."""
        if seq not in self.swapped or seq.status is not SequenceStatus.PAGING_BACK:
            return
        self.swapped.remove(seq)
        if ok:
            self.num_paged_back_blocks += len(seq.spilled)
            seq.spilled = []
            seq.status = SequenceStatus.RUNNING
            scheduler.running.append(seq)
            scheduler.running.sort(key=lambda s: s.arrival)
            return
        self.num_page_back_failures += 1
        seq.spilled = []
        scheduler.free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        scheduler.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> bool:
        """Forget a swapped sequence (aborted); False if it is not swapped."""
        if seq in self.swapped:
            self.swapped.remove(seq)
            return True
        return False

    def _head(self) -> Sequence | None:
        """The oldest swapped sequence, when it waits for blocks (None while one pages back: one at a time)."""
        if not self.swapped or any(s.status is SequenceStatus.PAGING_BACK for s in self.swapped):
            return None
        return self.swapped[0]

    def _enqueue(self, seq: Sequence) -> None:
        self.swapped.append(seq)
        self.swapped.sort(key=lambda s: s.arrival)
