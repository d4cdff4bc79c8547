"""The chained block hash, with no torch in it: the engine, the cache pool and the scheduler all key KV by it.

A full block's hash covers every token before it: h_i = blake2b(h_{i-1} || tokens of block i), h_{-1} =
blake2b(salt). Equal hashes mean equal KV only under equal salts (model, dtype, block size, tenant).
"""

from __future__ import annotations

import hashlib

import numpy as np

HASH_BYTES = 16


def block_hashes(token_ids, block_size: int, salt: bytes) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids` (a partial last block gets none)."""
    prev = hashlib.blake2b(salt, digest_size=HASH_BYTES).digest()
    out = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = np.asarray(token_ids[start:start + block_size], dtype="<i8").tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=HASH_BYTES).digest()
        out.append(prev)
    return out
