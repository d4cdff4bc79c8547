"""Cache keys: the engine's chained block hashes, salted with what makes equal tokens give equal KV.

The salt covers the model id, the KV dtype and the block size, plus an optional per-request `cache_salt` that
keeps tenants apart (a tenant cannot probe for, or be served, another tenant's prefix). The chain is the engine's
own (`kvmesh.services.engine.hashing`, which imports no torch, so the scheduler can compute it).
"""

from __future__ import annotations

from kvmesh.services.engine.hashing import HASH_BYTES, block_hashes  # noqa: F401 (re-exported)


def chain_salt(model_id: str, dtype: str, block_size: int, cache_salt: str = "") -> bytes:
    """The salt of a prompt's block-hash chain."""
    parts = [model_id, dtype, str(block_size)] + ([cache_salt] if cache_salt else [])
    return "\x1f".join(parts).encode()


def prompt_hashes(layout, token_ids, cache_salt: str = "") -> list[bytes]:
    """Hashes of the blocks of a prompt the cache may serve: its full blocks, except that the last prompt token
    always stays uncached (the prefill needs its logits). layout: anything with model_id, dtype, block_size."""
    usable = (len(token_ids) - 1) // layout.block_size
    if usable <= 0:
        return []
    salt = chain_salt(layout.model_id, layout.dtype, layout.block_size, cache_salt)
    return block_hashes(list(token_ids[:usable * layout.block_size]), layout.block_size, salt)


def full_block_hashes(layout, token_ids, cache_salt: str = "") -> list[bytes]:
    """Hashes of every full block of a prompt (what a finished prefill may offer the cache)."""
    salt = chain_salt(layout.model_id, layout.dtype, layout.block_size, cache_salt)
    return block_hashes(list(token_ids), layout.block_size, salt)
