"""The paged KV cache: one pool tensor of fixed-size blocks, a ref-counted block allocator, chained block hashes.

Memory layout (the contract that transports and the cache service code against):

    pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   (index 0 of dim 1 = K, 1 = V)

So one block of one layer's K (or V) is one contiguous run of `KVLayout.block_nbytes` bytes, and a run of
consecutive block ids is one contiguous run too. Seen as bytes the same memory is a numpy uint8 array
[num_layers, 2, num_blocks, block_nbytes] (`KVCache.byte_view()`); that is also the shape of `export_blocks`'
result and of `import_blocks`' input. Token t of a sequence lives in block `block_table[t // block_size]` at
offset `t % block_size` ("slot" = block_id * block_size + offset).

The layout itself (`KVLayout`) and the block hashes live in `kvmesh.services.kv_identity`, with no torch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kvmesh.services.engine.errors import InvalidRequestError, OutOfBlocksError
from kvmesh.services.kv_identity import KVLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The layout's name of a torch dtype ("float32", "bfloat16", "float16")."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise InvalidRequestError(f"unsupported KV dtype {dtype}; use one of {', '.join(DTYPES)}")


def pool_shape(layout: KVLayout, num_blocks: int) -> tuple[int, ...]:
    """The pool tensor's shape: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
    return (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)


class KVCache:
    """The pool of KV blocks of every layer, optionally living in caller-provided (e.g. shared) memory."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: str = "cpu", storage: np.ndarray | None = None):
        self.layout = layout
        self.num_blocks = num_blocks
        shape = pool_shape(layout, num_blocks)
        if storage is not None:
            expected = (layout.num_layers, 2, num_blocks, layout.block_nbytes)
            if storage.dtype != np.uint8 or tuple(storage.shape) != expected:
                raise InvalidRequestError(
                    f"KV storage must be uint8 {expected}, got {storage.dtype} {tuple(storage.shape)}")
            if str(device) != "cpu":
                raise InvalidRequestError("external KV storage is host memory; use device='cpu' with it")
            self._bytes = torch.from_numpy(storage)
            self.pool = self._bytes.view(DTYPES[layout.dtype]).view(shape)
        else:
            self.pool = torch.zeros(shape, dtype=DTYPES[layout.dtype], device=device)
            self._bytes = self.pool.view(torch.uint8).view(layout.num_layers, 2, num_blocks, layout.block_nbytes)

    def head_slice(self, rank: int, size: int) -> "KVCache":
        """Tensor-parallel rank `rank` of `size`'s view of this pool: the same memory, its 1/size of the KV heads
        (a strided view: each block stays whole in the pool, so transports and the cache see whole-head blocks).
        The view serves the forward pass (`layer`); byte-level export and import stay with the whole pool."""
        heads = self.layout.num_kv_heads
        if size < 1 or heads % size or not 0 <= rank < size:
            raise InvalidRequestError(f"rank {rank} of {size} cannot hold an even share of {heads} KV heads")
        per = heads // size
        view = KVCache.__new__(KVCache)
        view.layout = dataclasses.replace(self.layout, num_kv_heads=per)
        view.num_blocks = self.num_blocks
        view.pool = self.pool[..., rank * per:(rank + 1) * per, :]
        view._bytes = None
        return view

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V pools of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.pool[index, 0], self.pool[index, 1]

    def byte_view(self) -> np.ndarray:
        """The pool as numpy uint8 [num_layers, 2, num_blocks, block_nbytes], zero copy (CPU only)."""
        if self.pool.device.type != "cpu":
            raise InvalidRequestError("byte_view needs the KV pool on the CPU")
        return self._bytes.numpy()

    def export_blocks(self, block_ids: list[int]) -> np.ndarray:
        """A contiguous copy of the given blocks: uint8 [num_layers, 2, len(block_ids), block_nbytes]."""
        index = self._index(block_ids)
        return self._bytes.index_select(2, index).cpu().numpy()

    def import_blocks(self, block_ids: list[int], data: np.ndarray) -> None:
        """Write `data` (as `export_blocks` returns it) into the given blocks."""
        index = self._index(block_ids)
        expected = (self.layout.num_layers, 2, len(block_ids), self.layout.block_nbytes)
        if tuple(data.shape) != expected:
            raise InvalidRequestError(f"KV data must have shape {expected}, got {tuple(data.shape)}")
        src = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).to(self._bytes.device)
        self._bytes.index_copy_(2, index, src)

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        if any(b < 0 or b >= self.num_blocks for b in block_ids):
            raise InvalidRequestError(f"block ids must lie in [0, {self.num_blocks})")
        return torch.tensor(list(block_ids), dtype=torch.long, device=self._bytes.device)


class BlockAllocator:
    """Hands out block ids; a block returns to the free list when its reference count drops to zero."""

    def __init__(self, num_blocks: int):
        self.num_total_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refcount = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks, each with reference count 1."""
        if not self.can_allocate(n):
            raise OutOfBlocksError(f"need {n} KV blocks, {len(self._free)} of {self.num_total_blocks} free")
        ids = [self._free.pop() for _ in range(n)]
        for b in ids:
            self._refcount[b] = 1
        return ids

    def incref(self, block_ids: list[int]) -> None:
        """Share blocks: one more owner each."""
        for b in block_ids:
            if self._refcount[b] <= 0:
                raise InvalidRequestError(f"block {b} is not allocated; cannot share it")
            self._refcount[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds go back to the free list."""
        for b in block_ids:
            if self._refcount[b] <= 0:
                raise InvalidRequestError(f"block {b} freed more often than allocated")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def refcount(self, block_id: int) -> int:
        return self._refcount[block_id]
