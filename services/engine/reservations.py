"""Blocks held for prompts before they run: the decode side of disaggregation, and cached-prefix imports.

A reservation is taken by `LLMEngine.reserve` (fresh blocks for a prompt's length) or `reserve_prompt` (the
prompt's leading cached blocks shared from the prefix cache, fresh ones for the rest), and ends when the request
starts (`take`) or is dropped (`release`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.engine.errors import InvalidRequestError, OutOfBlocksError
from kvmesh.services.engine.prefix_cache import PrefixCache
from kvmesh.services.kv_identity import KVLayout


@dataclass(frozen=True)
class Reservation:
    """Blocks held for a prompt before it runs: the leading `num_cached_tokens` tokens' blocks are shared from the
    prefix cache (complete, never to be written), the rest are fresh. `block_hashes`: the prompt's reusable
    blocks' hashes when they were computed here from its tokens (trusted to seed its sequence); () otherwise."""

    block_ids: list[int]
    num_cached_tokens: int = 0
    cache_salt: str = ""
    block_hashes: tuple[bytes, ...] = ()


class Reservations:
    """The engine's reservations by request id (engine thread only, like the engine)."""

    def __init__(self, allocator, layout: KVLayout, prefix_cache: PrefixCache | None):
        self.allocator, self.layout, self.prefix_cache = allocator, layout, prefix_cache
        self._held: dict[str, Reservation] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    def values(self) -> list[Reservation]:
        """Every reservation held now."""
        return list(self._held.values())

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the blocks reserved for a request."""
        return list(self._held[request_id].block_ids)

    def reserve(self, request_id: str, num_prompt_tokens: int) -> list[int]:
        """Fresh blocks for a prompt of `num_prompt_tokens`; OutOfBlocksError when there is no room."""
        blocks = self.allocator.allocate(self.layout.num_blocks_for(num_prompt_tokens))
        self._held[request_id] = Reservation(blocks)
        return list(blocks)

    def reserve_prompt(self, request_id: str, prompt_token_ids: list[int], cache_salt: str = "",
                       block_hashes: list[bytes] | None = None) -> Reservation:
        """The prompt's leading cached blocks shared (never the block of its last token), fresh ones for the rest;
        `block_hashes` (its reusable blocks' hashes from the plan) spare hashing it. OutOfBlocksError when the
        fresh ones do not fit (nothing is taken then)."""
        hits, trusted = [], ()
        if self.prefix_cache is not None:
            if block_hashes is None:
                block_hashes = trusted = tuple(self.prefix_cache.prompt_hashes(prompt_token_ids, cache_salt))
            hits = self.prefix_cache.allocator.lookup(list(block_hashes))
        need = self.layout.num_blocks_for(len(prompt_token_ids)) - len(hits)
        revived = sum(1 for b in hits if self.allocator.refcount(b) == 0)  # cached-free hits stop being free
        if need > self.allocator.num_free_blocks - revived:
            raise OutOfBlocksError(f"need {need} KV blocks ({len(hits)} more shared), "
                                   f"{self.allocator.num_free_blocks - revived} of {self.allocator.num_total_blocks}"
                                   f" free")
        if hits:
            self.allocator.share(hits)
        reservation = Reservation(hits + self.allocator.allocate(need), len(hits) * self.layout.block_size,
                                  cache_salt, trusted)
        self._held[request_id] = reservation
        return Reservation(list(reservation.block_ids), reservation.num_cached_tokens, cache_salt, trusted)

    def take(self, request_id: str, num_tokens: int) -> Reservation:
        """End a reservation as its request starts: InvalidRequestError when it is too small for num_tokens."""
        blocks = self._held[request_id].block_ids
        if len(blocks) < self.layout.num_blocks_for(num_tokens):
            raise InvalidRequestError(f"request {request_id!r} reserved {len(blocks)} blocks, too few for "
                                      f"{num_tokens} prompt tokens")
        return self._held.pop(request_id)

    def release(self, request_id: str) -> bool:
        """Free a reservation's blocks; False when the request holds none."""
        reservation = self._held.pop(request_id, None)
        if reservation is None:
            return False
        self.allocator.free(reservation.block_ids)
        return True
