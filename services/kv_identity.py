"""A prompt's KV identity, the one definition every part keys KV by: no torch, no gRPC, no service in here.

* `KVLayout`: the shape of a model's KV blocks (what two workers must agree on to exchange them), with its one
  protobuf conversion (`KVLayout.from_proto` / `to_proto`).
* The chain: a full block's hash covers every token before it, h_i = blake2b(h_{i-1} || tokens of block i),
  h_{-1} = blake2b(salt). Equal hashes mean equal KV only under equal salts, so every pool (the engine's prefix
  cache, the cache service, the scheduler's index) salts with `chain_salt` (model id, dtype, block size, tenant).
* The reusable-prefix rule: the last prompt token always stays uncached (the prefill needs its logits), so only
  `reusable_blocks(n, block_size)` leading blocks of an n-token prompt may come from a cache.
* The local-prefill rule: when a decode worker's pool holds every reusable block and the tail is short, the decode
  worker prefills the tail itself (`prefill_locally`); the scheduler decides with it and the plan carries it.
* `checksum`: the integrity check every block payload carries.

Hash a prompt once per process and pass the hashes on: `hash_block` is the only place a block is hashed, so a
test can count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from kvmesh.v1 import common_pb2

HASH_BYTES = 16
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class KVLayout:
    """The shape of a model's KV blocks: what two workers must agree on to exchange blocks."""

    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_proto(cls, msg: common_pb2.KVLayout) -> "KVLayout":
        """The layout a KVLayout message describes."""
        return cls(msg.model_id, msg.dtype, msg.block_size, msg.num_layers, msg.num_kv_heads, msg.head_dim)

    def to_proto(self) -> common_pb2.KVLayout:
        """This layout as the KVLayout message workers exchange."""
        return common_pb2.KVLayout(model_id=self.model_id, dtype=self.dtype, block_size=self.block_size,
                                   num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                                   head_dim=self.head_dim)

    def validate(self) -> None:
        """Raise ValueError unless every field is set and positive and the dtype is known."""
        if not self.model_id or not self.dtype:
            raise ValueError("layout.model_id and layout.dtype must be set")
        if min(self.block_size, self.num_layers, self.num_kv_heads, self.head_dim) <= 0:
            raise ValueError(f"layout sizes must be positive, got {self}")

    @property
    def itemsize(self) -> int:
        """Bytes of one KV element."""
        return DTYPE_BYTES[self.dtype]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of K (or of V) in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one whole block: K and V of every layer (a cached block's payload)."""
        return 2 * self.num_layers * self.block_nbytes

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)


def block_payload_bytes(layout) -> int | None:
    """Bytes of one whole block of a layout (a KVLayout or its message): K and V of every layer; None when the
    layout does not say (an unknown dtype, no block size)."""
    if layout.dtype not in DTYPE_BYTES or layout.block_size <= 0:
        return None
    return KVLayout(layout.model_id, layout.dtype, layout.block_size, layout.num_layers, layout.num_kv_heads,
                    layout.head_dim).block_bytes


def chain_salt(model_id: str, dtype: str, block_size: int, cache_salt: str = "") -> bytes:
    """The salt of a prompt's block-hash chain: model id, KV dtype, block size and the tenant's cache salt."""
    parts = [model_id, dtype, str(block_size)] + ([cache_salt] if cache_salt else [])
    return "\x1f".join(parts).encode()


def tenant_salt(tenant: str | None, cache_salt: str = "") -> str:
    """The cache salt a request's blocks are hashed under: the client's `cache_salt` inside its tenant's
    namespace (the tenant's length first, so no client salt can spell another tenant's prefix); None (a gateway
    that checks no keys, so knows no tenants) leaves the client's salt as it is."""
    if tenant is None:
        return cache_salt
    return f"tenant:{len(tenant)}:{tenant}:{cache_salt}"


def layout_salt(layout: KVLayout, cache_salt: str = "") -> bytes:
    """`chain_salt` of a layout (anything with model_id, dtype, block_size) and a tenant's salt."""
    return chain_salt(layout.model_id, layout.dtype, layout.block_size, cache_salt)


def hash_block(prev: bytes, block_token_ids: Sequence[int]) -> bytes:
    """The hash of one full block chained onto the hash before it: the only place a block is hashed."""
    block = np.asarray(block_token_ids, dtype="<i8").tobytes()
    return hashlib.blake2b(prev + block, digest_size=HASH_BYTES).digest()


def extend_block_hashes(hashes: Sequence[bytes], token_ids: Sequence[int], block_size: int,
                        salt: bytes) -> list[bytes]:
    """`hashes` (those of the leading blocks of `token_ids`) followed by the hashes of its remaining full blocks."""
    prev = hashes[-1] if hashes else hashlib.blake2b(salt, digest_size=HASH_BYTES).digest()
    out = list(hashes)
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        prev = hash_block(prev, token_ids[start:start + block_size])
        out.append(prev)
    return out


def block_hashes(token_ids: Sequence[int], block_size: int, salt: bytes) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids` (a partial last block gets none)."""
    return extend_block_hashes([], token_ids, block_size, salt)


def reusable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """Leading full blocks of a prompt that may come from a cache: all but the one of its last token, whose
    logits the prefill must compute."""
    return max(0, (num_prompt_tokens - 1) // block_size)


def reusable_tokens(num_prompt_tokens: int, block_size: int) -> int:
    """Prompt tokens that may come from a cache (`reusable_blocks` in tokens)."""
    return reusable_blocks(num_prompt_tokens, block_size) * block_size


def prompt_hashes(layout, token_ids: Sequence[int], cache_salt: str = "") -> list[bytes]:
    """Hashes of the reusable blocks of a prompt (layout: anything with model_id, dtype, block_size)."""
    usable = reusable_tokens(len(token_ids), layout.block_size)
    if usable <= 0:
        return []
    return block_hashes(token_ids[:usable], layout.block_size, layout_salt(layout, cache_salt))


class PromptHashes:
    """A prompt's reusable-block hashes under each layout asked for, each chain hashed once (a chain depends on
    the layout's model id, dtype and block size and the tenant's salt): one per request in the scheduler."""

    def __init__(self, token_ids: Sequence[int], cache_salt: str = ""):
        self.token_ids, self.cache_salt = token_ids, cache_salt
        self._by_chain: dict[tuple[str, str, int], list[bytes]] = {}

    def of(self, layout) -> list[bytes]:
        """The prompt's reusable-block hashes under `layout` (see `prompt_hashes`)."""
        key = (layout.model_id, layout.dtype, layout.block_size)
        if key not in self._by_chain:
            self._by_chain[key] = prompt_hashes(layout, self.token_ids, self.cache_salt)
        return self._by_chain[key]


def full_block_hashes(layout, token_ids: Sequence[int], cache_salt: str = "",
                      known: Sequence[bytes] = ()) -> list[bytes]:
    """Hashes of every full block of `token_ids` (what a finished prefill may offer the cache), hashing only the
    blocks past `known` (the hashes of its leading blocks, e.g. a prompt's reusable ones from the plan)."""
    known = known[:len(token_ids) // layout.block_size]
    return extend_block_hashes(known, token_ids, layout.block_size, layout_salt(layout, cache_salt))


def check_prompt_hashes(hashes: Sequence[bytes], num_prompt_tokens: int, block_size: int) -> list[bytes]:
    """Hashes a peer sent for a prompt, if they can be its reusable blocks' (right count, right size); [] if not.

    A receiver cannot tell a wrong chain from a right one without hashing the prompt itself; it trusts the
    scheduler's hashes for lookups in pools keyed by them (a wrong hash only misses or poisons no one: a pool
    stores a block under the hash of the KV the block was computed from, see `full_block_hashes`)."""
    if len(hashes) != reusable_blocks(num_prompt_tokens, block_size):
        return []
    if any(len(h) != HASH_BYTES for h in hashes):
        return []
    return list(hashes)


def prefill_locally(num_prompt_tokens: int, num_cached_tokens: int, block_size: int, max_tokens: int) -> bool:
    """Whether a decode worker whose pool holds `num_cached_tokens` leading prompt tokens prefills the prompt
    itself: it holds every reusable block and the tail left is at most `max_tokens` (cheaper than a round trip
    to a prefill worker and a transfer)."""
    usable = reusable_tokens(num_prompt_tokens, block_size)
    return 0 < num_cached_tokens and num_cached_tokens >= usable and num_prompt_tokens - num_cached_tokens <= max_tokens


def checksum(data: bytes | memoryview) -> int:
    """xxh3_64 of a block payload: the checksum every block carries (puts, fetches, block files)."""
    return xxhash.xxh3_64_intdigest(data)
