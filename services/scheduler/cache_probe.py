"""How much of a prompt the cache holds, per KV layout: what the routing policies weigh against load.

This is the request's one cache lookup (it counts hits and misses and marks the hits used), with a short deadline;
the plan carries its answer to the prefill worker, which fetches that many blocks without asking again. A cache
that is absent or slow is taken to hold nothing, so routing never waits long on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmesh.services.clients.cache import CacheClient
from kvmesh.services.common.channels import ChannelCache
from kvmesh.services.kv_identity import KVLayout, PromptHashes
from kvmesh.services.scheduler.policies import RouteQuery
from kvmesh.services.scheduler.registry import Role, Worker

PROBE_TIMEOUT_S = 0.25


class CacheProbe:
    """Asks the registered cache service how many leading prompt tokens it holds."""

    def __init__(self, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.channels = ChannelCache()

    async def cached_tokens(self, query: RouteQuery, workers: Sequence[Worker],
                            hashes: PromptHashes | None = None) -> dict[KVLayout, int]:
        """Cached leading tokens of query's prompt for each layout a prefill worker has; {} without a cache.
        `hashes`: the request's, when the caller has them (the prompt is hashed once per request)."""
        hashes = hashes or PromptHashes(query.prompt_token_ids, query.cache_salt or "")
        cache = next((w for w in workers if w.spec.role == Role.CACHE), None)
        if cache is None:
            return {}
        layouts = {w.spec.layout for w in workers if w.spec.role == Role.PREFILL and w.spec.layout is not None}
        out = {}
        for layout in layouts:
            block_hashes = hashes.of(layout)
            if not block_hashes:
                continue
            async def address(addr: str = cache.spec.address) -> str:
                return addr

            client = CacheClient(self.channels, address, layout.to_proto(), self.timeout_s)
            out[layout] = await client.lookup(block_hashes) * layout.block_size
        return out

    async def close(self) -> None:
        await self.channels.close()
