"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step first serves the running sequences (one decode token each, then the next chunk of each long
prompt still prefilling, oldest first), then admits waiting ones (by priority, lower first, as vLLM's
`--scheduling-policy priority` orders its queue; arrival order within a priority) while the token budget
(max_num_batched_tokens), the free blocks and max_num_seqs allow. With `pack_prompt_tokens` set, a waiting prompt
starts only while the step holds fewer prompt tokens than that: on a compute-bound worker (a CPU, where a step's
time grows with every token) packing a second long prompt into a step adds no throughput and delays the first
one's first token by the second's whole cost. When a running sequence needs a block and none is free, the newest
running sequence is preempted: its blocks are freed and it waits at the front of the queue to be recomputed from
its tokens. With a `swap` (swap.py) the victim's oldest blocks are spilled to a store instead, and paged back
before it runs again; swapped sequences come back before any waiting one is admitted.
With a prefix cache, a waiting sequence that holds no blocks (new, or preempted) shares its cached leading
blocks when it is admitted, so only the rest is computed; a waiting sequence never pins cached blocks.
"""

from __future__ import annotations

from collections import deque

from kvmesh.services.engine.kv_cache import BlockAllocator
from kvmesh.services.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Owns the waiting queue and the running list; hands out and takes back KV blocks."""

    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                 prefix_cache=None):
        self.allocator = allocator
        self.prefix_cache = prefix_cache  # a prefix_cache.PrefixCache, or None
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.swap = None  # a swap.Swap: spill blocks to a store instead of preempting (None: preempt)
        self.pack_prompt_tokens = 0  # start a waiting prompt only below this many prompt tokens (0: budget only)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence behind every waiting one of its priority or a more urgent one (lower value), ahead of
        the less urgent (blocks it already holds, e.g. a reservation, are kept)."""
        seq.status = SequenceStatus.WAITING
        priority = seq.params.priority
        for index, other in enumerate(self.waiting):
            if other.params.priority > priority:
                self.waiting.insert(index, seq)
                return
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence whose KV is already in its blocks straight into the running batch."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (its blocks are the caller's business)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif self.swap is not None:
            self.swap.remove(seq)

    def free_blocks(self, seq: Sequence) -> None:
        self.allocator.free([b for b in seq.block_table if b >= 0])  # -1: spilled, held by no one here
        seq.block_table = []
        seq.spilled = []
        seq.num_hashed_blocks = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running) or (self.swap is not None and self.swap.has_work(self))

    @property
    def num_swapped(self) -> int:
        """Sequences with KV spilled out (waiting for blocks, or paging back)."""
        return len(self.swap.swapped) if self.swap is not None else 0

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The (sequence, number of tokens) pairs of the next step; blocks for them are allocated."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        prompt_tokens = 0  # of prompts being prefilled, in this step
        # decodes first (stable: oldest first within each group), so a long prompt's chunks never starve them
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                continue
            while not self.allocator.can_allocate(self._blocks_needed(seq, n)):
                preempted = True
                victim = self._make_room(seq, self._blocks_needed(seq, n) - self.allocator.num_free_blocks,
                                         [s for s, _ in scheduled])
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self._grow(seq, n)
            scheduled.append((seq, n))
            budget -= n
            prompt_tokens += n if n > 1 else 0
        if self.swap is not None and not preempted:
            self.swap.page_back(self)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            if self.pack_prompt_tokens and prompt_tokens >= self.pack_prompt_tokens:
                break
            seq = self.waiting[0]
            if self.num_swapped and not seq.block_table:  # swapped ones first; one holding a reservation goes on
                break
            if not self._share_prefix(seq, budget):
                break
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.allocator.can_allocate(self._blocks_needed(seq, n)):
                break
            self.waiting.popleft()
            self._grow(seq, n)
            self.add_running(seq)
            scheduled.append((seq, n))
            budget -= n
            prompt_tokens += n
        return scheduled

    def _make_room(self, seq: Sequence, need: int, busy: list[Sequence]) -> Sequence:
        """Free blocks for `seq`: spill a victim's (with a swap; none of `busy`, scheduled already), else preempt
        the newest running sequence."""
        victim = self.swap.spill(self, seq, need, busy) if self.swap is not None else None
        if victim is None:
            victim = self.running[-1]
            self._preempt(victim)
        return victim

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        total = -(-(seq.num_computed_tokens + n) // self.block_size)
        return max(0, total - len(seq.block_table))

    def _share_prefix(self, seq: Sequence, budget: int) -> bool:
        """Share the cached leading blocks of a waiting sequence that holds none, if its first chunk then fits
        (False: it does not, nothing taken). Its tokens cached at first admission count as its cached tokens."""
        if self.prefix_cache is None or seq.block_table:
            return True
        hits, hashes = self.prefix_cache.cached_prefix(seq.token_ids, seq.cache_salt, seq.block_hashes)
        if len(hashes) > len(seq.block_hashes):  # hashed here from its own tokens: keep them for cache_blocks
            seq.block_hashes = hashes
        if not hits:
            return True
        cached = len(hits) * self.block_size
        need = -(-(cached + min(seq.num_tokens - cached, budget)) // self.block_size) - len(hits)
        revived = sum(1 for b in hits if self.allocator.refcount(b) == 0)  # cached-free hits stop being free
        if need > self.allocator.num_free_blocks - revived:
            return False
        self.allocator.share(hits)
        seq.block_table = hits
        seq.num_computed_tokens = cached
        seq.num_hashed_blocks = len(hits)
        if seq.num_output_tokens == 0:
            seq.num_cached_tokens = cached
        return True

    def try_grow(self, seq: Sequence, n: int) -> bool:
        """Give a running sequence blocks for its next `n` tokens if they are free (False: none taken)."""
        if not self.allocator.can_allocate(self._blocks_needed(seq, n)):
            return False
        self._grow(seq, n)
        return True

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past a sequence's last token (grown for draft tokens that were rejected)."""
        keep = -(-seq.num_tokens // self.block_size)
        if len(seq.block_table) > keep:
            self.allocator.free(seq.block_table[keep:])
            del seq.block_table[keep:]

    def _grow(self, seq: Sequence, n: int) -> None:
        need = self._blocks_needed(seq, n)
        if need:
            seq.block_table.extend(self.allocator.allocate(need))

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it will be recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        self.free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
