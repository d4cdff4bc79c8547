"""Which KV blocks each decode worker's own prefix cache holds, as its heartbeats' KV events report them.

A worker's events are deltas since its last acknowledged heartbeat, or a full resync (after it registered, after a
failed heartbeat, after an overflow, or when asked). Deltas for a worker the index never saw a resync from are
refused with a request to resync. A worker's entry goes when it leaves the registry (deregistered, replaced, or
its lease lapsed). The index is a routing hint: a hash it lists may already be evicted, and the decode worker
looks up its own pool again when the request arrives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvmesh.services.kv_identity import PromptHashes


class KVIndex:
    """Per decode worker, the set of chained block hashes its pool holds."""

    def __init__(self) -> None:
        self._held: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def apply(self, worker_id: str, stored: Iterable[bytes], removed: Iterable[bytes], full: bool) -> bool:
        """Apply one heartbeat's events; False when they are deltas the index cannot place (ask for a resync)."""
        if full:
            self._held[worker_id] = set(stored)
            return True
        held = self._held.get(worker_id)
        if held is None:
            return False
        held.update(stored)
        held.difference_update(removed)
        return True

    def drop(self, worker_id: str) -> None:
        """Forget a worker (it left the registry)."""
        self._held.pop(worker_id, None)

    def num_hashes(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))

    def hit_blocks(self, worker_id: str, hashes: Sequence[bytes]) -> int:
        """Leading `hashes` the worker holds (stops at the first it lacks)."""
        held = self._held.get(worker_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def hit_tokens(self, workers, token_ids: Sequence[int], cache_salt: str,
                   hashes: PromptHashes | None = None) -> dict[str, int]:
        """Leading prompt tokens each decode worker's pool holds (hashed as every pool keys them: the chain of its
        layout and the request's salt, leaving the last prompt token out). `hashes`: the request's, when the
        caller has them (the prompt is hashed once per request)."""
        hashes = hashes or PromptHashes(token_ids, cache_salt)
        out = {}
        for worker in workers:
            layout = worker.spec.layout
            if layout is None or worker.worker_id not in self._held:
                continue
            out[worker.worker_id] = self.hit_blocks(worker.worker_id, hashes.of(layout)) * layout.block_size
        return out
