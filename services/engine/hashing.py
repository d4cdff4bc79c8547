"""The chained block hash, with no torch in it: the engine, the cache pool and the scheduler all key KV by it.

A full block's hash covers every token before it: h_i = blake2b(h_{i-1} || tokens of block i), h_{-1} =
blake2b(salt). Equal hashes mean equal KV only under equal salts (model, dtype, block size, tenant): `chain_salt`
is the one salt every pool uses (the cache service's keys and the decode workers' own prefix caches alike).
"""

from __future__ import annotations

import hashlib

import numpy as np

HASH_BYTES = 16


def chain_salt(model_id: str, dtype: str, block_size: int, cache_salt: str = "") -> bytes:
    """The salt of a prompt's block-hash chain: model id, KV dtype, block size and the tenant's cache salt."""
    parts = [model_id, dtype, str(block_size)] + ([cache_salt] if cache_salt else [])
    return "\x1f".join(parts).encode()


def block_hashes(token_ids, block_size: int, salt: bytes) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids` (a partial last block gets none)."""
    return extend_block_hashes([], token_ids, block_size, salt)


def extend_block_hashes(hashes: list[bytes], token_ids, block_size: int, salt: bytes) -> list[bytes]:
    """`hashes` (those of the leading blocks of `token_ids`) followed by the hashes of its remaining full blocks."""
    prev = hashes[-1] if hashes else hashlib.blake2b(salt, digest_size=HASH_BYTES).digest()
    out = list(hashes)
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        block = np.asarray(token_ids[start:start + block_size], dtype="<i8").tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=HASH_BYTES).digest()
        out.append(prev)
    return out
