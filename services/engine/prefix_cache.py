"""Automatic prefix caching: full KV blocks stay findable by their chained hash after their owners let go.

A block is in one of three states:

* free — nobody holds it and it caches nothing;
* held — reference count > 0 (a sequence or a reservation owns it); it may also be findable by hash, once its
  KV is complete (`cache`), never while its owner is still writing it;
* cached-free — reference count 0, still findable by hash, kept in LRU order. `allocate` takes truly free
  blocks first and evicts the least recently used cached-free block only when none is left; `share` takes a
  cached-free block back (reference count 1) or adds an owner to a held one.

`num_free_blocks` counts free plus cached-free blocks: what an allocation can get. Every change to the set of
findable hashes is recorded as a KV event (stored / removed) for the scheduler's index (`drain_events`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvmesh.services.engine.errors import InvalidRequestError, OutOfBlocksError
from kvmesh.services import kv_identity
from kvmesh.services.engine.kv_cache import BlockAllocator
from kvmesh.services.kv_identity import KVLayout


@dataclass(frozen=True)
class KVEvents:
    """Changes to the set of block hashes a pool holds. `full`: `stored` is the whole set (replace, not add)."""

    stored: tuple[bytes, ...] = ()
    removed: tuple[bytes, ...] = ()
    full: bool = False


class PrefixCachingAllocator(BlockAllocator):
    """A ref-counted block allocator whose released full blocks stay findable by hash until evicted (LRU)."""

    def __init__(self, num_blocks: int):
        super().__init__(num_blocks)
        self._hash_of: dict[int, bytes] = {}  # findable blocks (held or cached-free) -> their hash
        self._block_of: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached-free blocks, least recently used first
        self._events: dict[bytes, bool] = {}  # hash -> True (stored) / False (removed) since the last drain
        self.num_hit_blocks = 0
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, held or cached-free."""
        return len(self._hash_of)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._lru)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks (reference count 1, findable by nothing); evicts cached-free blocks, LRU first."""
        if not self.can_allocate(n):
            raise OutOfBlocksError(f"need {n} KV blocks, {self.num_free_blocks} of {self.num_total_blocks} free")
        ids = []
        for _ in range(n):
            if self._free:
                ids.append(self._free.pop())
            else:
                block, _ = self._lru.popitem(last=False)
                self._forget(block)
                self.num_evictions += 1
                ids.append(block)
        for b in ids:
            self._refcount[b] = 1
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. A findable block nobody holds becomes cached-free; the others free.
        Blocks are taken in reverse, so a sequence's tail is evicted before its head."""
        for b in reversed(block_ids):
            if self._refcount[b] <= 0:
                raise InvalidRequestError(f"block {b} freed more often than allocated")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                if b in self._hash_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def cache(self, block_id: int, block_hash: bytes) -> bool:
        """Make a held block whose KV is complete findable by `block_hash`; False when another block already has
        that hash (this one then stays private) or it is findable already."""
        if self._refcount[block_id] <= 0:
            raise InvalidRequestError(f"block {block_id} is not held; only a held, complete block can be cached")
        if block_hash in self._block_of or block_id in self._hash_of:
            return False
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id
        self._events[block_hash] = True
        return True

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The blocks holding the leading `hashes` (stops at the first miss); shares nothing."""
        out = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def share(self, block_ids: list[int]) -> None:
        """Take one more reference to findable blocks (a cached-free one becomes held again)."""
        for b in block_ids:
            if b not in self._hash_of:
                raise InvalidRequestError(f"block {b} caches nothing; only findable blocks are shared")
            self._lru.pop(b, None)
            self._refcount[b] += 1
        self.num_hit_blocks += len(block_ids)

    def hashes(self) -> list[bytes]:
        """Every findable hash, most recently used last (held blocks count as most recent)."""
        held = [h for b, h in self._hash_of.items() if b not in self._lru]
        return [self._hash_of[b] for b in self._lru] + held

    def drain_events(self, max_hashes: int) -> KVEvents:
        """The stored/removed hashes since the last drain; the full set (capped at the `max_hashes` most recent)
        when there are more changes than that."""
        events, self._events = self._events, {}
        if len(events) > max_hashes:
            return self.snapshot(max_hashes)
        return KVEvents(tuple(h for h, stored in events.items() if stored),
                        tuple(h for h, stored in events.items() if not stored))

    def snapshot(self, max_hashes: int) -> KVEvents:
        """The whole set of findable hashes (the `max_hashes` most recent), replacing pending events."""
        self._events = {}
        return KVEvents(tuple(self.hashes()[-max_hashes:]) if max_hashes > 0 else (), (), full=True)

    def _forget(self, block: int) -> None:
        h = self._hash_of.pop(block)
        del self._block_of[h]
        self._events[h] = False


class PrefixCache:
    """The engine's side of prefix caching: which leading blocks of a prompt the pool holds, and which blocks of a
    sequence became complete (and so findable). Hashes are the one chain of `kv_identity`."""

    STATS = ("cached_blocks", "cached_free_blocks", "hit_blocks", "evictions")

    def __init__(self, allocator: PrefixCachingAllocator, layout: KVLayout):
        self.allocator, self.layout = allocator, layout

    def prompt_hashes(self, prompt_token_ids: list[int], cache_salt: str = "",
                      known: list[bytes] | tuple = ()) -> list[bytes]:
        """Hashes of the prompt's reusable blocks (`kv_identity.reusable_blocks`) under this layout and the
        tenant's salt, hashing only the blocks past `known` (hashes of its leading blocks computed here before)."""
        usable = kv_identity.reusable_tokens(len(prompt_token_ids), self.layout.block_size)
        known = list(known[:usable // self.layout.block_size])
        return kv_identity.extend_block_hashes(known, prompt_token_ids[:usable], self.layout.block_size,
                                               self._salt(cache_salt))

    def cached_prefix(self, prompt_token_ids: list[int], cache_salt: str,
                      known: list[bytes] | tuple = ()) -> tuple[list[int], list[bytes]]:
        """The findable blocks of the prompt's leading reusable blocks (its last token is left to compute), and
        the prompt's reusable blocks' hashes (hashed past `known`)."""
        hashes = self.prompt_hashes(prompt_token_ids, cache_salt, known)
        return self.allocator.lookup(hashes), hashes

    def cache_blocks(self, seq) -> None:
        """Make a sequence's newly completed full blocks (all KV computed or landed) findable by hash."""
        bs = self.layout.block_size
        done = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if done <= seq.num_hashed_blocks:
            return
        if len(seq.block_hashes) < done:  # hashes known already (the reservation's, a preempted run's) are kept
            seq.block_hashes = kv_identity.extend_block_hashes(seq.block_hashes, seq.token_ids[:done * bs], bs,
                                                               self._salt(seq.cache_salt))
        for i in range(seq.num_hashed_blocks, done):
            self.allocator.cache(seq.block_table[i], seq.block_hashes[i])
        seq.num_hashed_blocks = done

    def stats(self) -> dict[str, int]:
        a = self.allocator
        return {"cached_blocks": a.num_cached_blocks, "cached_free_blocks": a.num_cached_free_blocks,
                "hit_blocks": a.num_hit_blocks, "evictions": a.num_evictions}

    def events(self, full: bool, max_hashes: int) -> KVEvents:
        return self.allocator.snapshot(max_hashes) if full else self.allocator.drain_events(max_hashes)

    def _salt(self, cache_salt: str) -> bytes:
        return kv_identity.layout_salt(self.layout, cache_salt)
