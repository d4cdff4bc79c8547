"""Transfers between pools of different block sizes: the sender re-chunks, every backend moves what it always does.

Two layouts that differ only in `block_size` hold the same bytes per token: a block of one layer's K (or V) is
[block_size, num_kv_heads, head_dim], token-major, so token t of a run of blocks is bytes [t*T, (t+1)*T) of their
concatenation (T = num_kv_heads * head_dim * itemsize). A transfer into a receiver of another block size moves a token
range: the destination blocks hold tokens [t0, t0 + len(dst) * dst_size) of a sequence, the source blocks begin at
token t0 - src_token_offset (`Sender.open(..., src_token_offset=)`: t0 need not fall on a source block's boundary).

The sender gathers each layer's tokens, as soon as the layer is sent, into staging blocks of the receiver's size in
its own memory (one copy of that layer, off the loop when large) and sends those through an ordinary transfer of the
receiver's layout — receivers, record checks, checksums and all backends see a transfer like any other. Destination
token slots past the source's last block are zeroed (a partial last block: slots no one reads). `Sender` makes one
`Rechunker` per receiver block size, lazily, over a `StagingPool` sized like its own pool.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import numpy as np

import kvmesh.transports.errors as errors
from kvmesh.transports.base import OFFLOAD_BYTES
from kvmesh.transports.blocks import as_block_ids
from kvmesh.v1 import common_pb2

#: The layout fields two pools must share for one's tokens to map onto the other's blocks.
MAPPED_FIELDS = ("model_id", "dtype", "num_layers", "num_kv_heads", "head_dim")


def unmappable(src: common_pb2.KVLayout, dst: common_pb2.KVLayout) -> str | None:
    """Why tokens of a pool of layout `src` cannot be written into one of layout `dst` ("model_id 'a' != 'b'",
    one clause per field that differs), or None: equal but for the block size, which a transfer re-chunks."""
    diffs = [f"{name} {getattr(src, name)!r} != {getattr(dst, name)!r}" for name in MAPPED_FIELDS
             if getattr(src, name) != getattr(dst, name)]
    if src.block_size <= 0 or dst.block_size <= 0:
        diffs.append(f"block_size {src.block_size} / {dst.block_size} (must be > 0)")
    return "; ".join(diffs) or None


class StagingPool:
    """Blocks of the receiver's size in the sender's memory, handed out as contiguous ranges (first fit)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array  # [num_layers, 2, num_blocks, dst block bytes]
        self._holes: list[tuple[int, int]] = [(0, array.shape[2])]  # (start, length), sorted

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by a transfer (all of them when nothing leaks)."""
        return sum(n for _, n in self._holes)

    def allocate(self, n: int) -> int:
        """The first of `n` contiguous free blocks; TransportError when no hole is large enough."""
        for i, (start, length) in enumerate(self._holes):
            if length >= n:
                self._holes[i:i + 1] = [(start + n, length - n)] if length > n else []
                return start
        raise errors.TransportError(f"re-chunking staging full: no {n} free blocks in a row "
                                    f"({self.num_free_blocks} of {self.array.shape[2]} free)")

    def free(self, start: int, n: int) -> None:
        """Give back a range `allocate` returned (coalescing holes)."""
        holes = sorted(self._holes + [(start, n)])
        merged: list[tuple[int, int]] = []
        for s, length in holes:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self._holes = merged


class Rechunker:
    """Opens re-chunking transfers into receivers of one block size: `inner` is a Sender over the staging pool with
    the receiver's layout (made by the outer `Sender`, which closes it)."""

    def __init__(self, pool: np.ndarray, src_block_size: int, staging: StagingPool, inner) -> None:
        self.pool, self.src_block_size, self.staging, self.inner = pool, src_block_size, staging, inner

    @property
    def num_busy_blocks(self) -> int:
        """Staging blocks held by open transfers (0 when nothing leaks)."""
        return self.staging.array.shape[2] - self.staging.num_free_blocks

    async def open(self, descriptor, transfer_id: str, dst_block_ids: Sequence[int], timeout: float,
                   src_token_offset: int) -> "RechunkedTransfer":
        if not 0 <= src_token_offset < self.src_block_size:
            raise errors.InvalidTransfer(f"src_token_offset must lie in [0, {self.src_block_size}), "
                                         f"got {src_token_offset}")
        n = len(dst_block_ids)
        start = self.staging.allocate(max(n, 1))
        try:
            inner = await self.inner.open(descriptor, transfer_id, dst_block_ids, timeout)
        except BaseException:
            self.staging.free(start, max(n, 1))
            raise
        return RechunkedTransfer(self, inner, start, n, src_token_offset)


class RechunkedTransfer:
    """A transfer whose `send_layer` takes the sender's own block ids and sends them re-chunked (see the module
    docstring); otherwise the inner transfer's calls (`commit`, `abort`, `keep_alive`, `opened`, stats)."""

    def __init__(self, rechunker: Rechunker, inner, start: int, num_dst: int, src_token_offset: int) -> None:
        self.rechunker, self.inner, self.start, self.num_dst = rechunker, inner, start, num_dst
        self.first_byte = src_token_offset * (rechunker.pool.shape[3] // rechunker.src_block_size)
        self._freed = False
        self._ids = np.arange(start, start + num_dst)  # one object for every layer: its runs are computed once

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def send_layer(self, layer: int, src_block_ids: Sequence[int] | np.ndarray) -> None:
        """Gather this layer's tokens of `src_block_ids` (the sender's pool) into the staging blocks, then send."""
        r = self.rechunker
        if not 0 <= layer < r.pool.shape[0]:
            raise errors.InvalidTransfer(f"layer {layer} out of range [0, {r.pool.shape[0]})")
        try:
            src = as_block_ids(src_block_ids, r.pool.shape[2], "src_block_ids")
        except ValueError as exc:
            raise errors.InvalidTransfer(str(exc)) from None
        try:
            if self.inner.state == "open" and not self._freed:
                dst = r.staging.array[layer, :, self.start:self.start + self.num_dst]
                if dst.nbytes >= OFFLOAD_BYTES:
                    await asyncio.to_thread(gather_tokens, r.pool[layer], src, self.first_byte, dst)
                else:
                    gather_tokens(r.pool[layer], src, self.first_byte, dst)
            await self.inner.send_layer(layer, self._ids)
        except BaseException:
            if self.inner.state != "open":  # the inner transfer failed and aborted itself: nothing reads staging
                self._release()
            raise

    async def commit(self):
        try:
            return await self.inner.commit()
        finally:
            self._release()

    async def abort(self, reason: str = "aborted by sender") -> None:
        try:
            await self.inner.abort(reason)
        finally:
            self._release()

    async def __aenter__(self) -> "RechunkedTransfer":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            await self.abort(f"aborted: {exc_type.__name__}: {exc}")

    def _release(self) -> None:
        """Give the staging blocks back once the inner transfer ended (committed or aborted: nothing reads them)."""
        if not self._freed:
            self._freed = True
            self.rechunker.staging.free(self.start, max(self.num_dst, 1))


def gather_tokens(layer_pool: np.ndarray, src_ids: np.ndarray, first_byte: int, dst: np.ndarray) -> None:
    """Copy the bytes of blocks `src_ids` of one layer (`layer_pool`: [2, blocks, src block bytes]) from byte
    `first_byte` of the first (a token boundary) into `dst` ([2, n, dst block bytes], contiguous blocks), token slot
    after token slot; dst bytes past the source's end are zeroed."""
    for kv in (0, 1):
        out = dst[kv].reshape(-1)
        src = layer_pool[kv, src_ids].reshape(-1)[first_byte:]
        take = min(src.size, out.size)
        out[:take] = src[:take]
        out[take:] = 0
