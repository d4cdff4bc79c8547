"""Transfers between pools of different block sizes, on every backend: the sender re-chunks (transports/rechunk.py),
so the receiver's blocks hold the same tokens as the sender's, and an unmappable layout is refused by name."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from harness import layout_for, pool_region
from kvmesh.transports import LayoutMismatch
from kvmesh.transports.blocks import layer_checksum
from kvmesh.transports.sender import Sender

SRC_BLOCKS = 64


def src_layout(block_size: int, **changes):
    """The receiver's float32 layout (block size 4, 64 bytes a token) with the sender's block size."""
    layout = layout_for("float32")
    layout.block_size = block_size
    for name, value in changes.items():
        setattr(layout, name, value)
    return layout


def filled(layout, kv_pool: str, seed: int):
    region = pool_region(layout, SRC_BLOCKS, "grpc", kv_pool)
    region.array[:] = np.random.default_rng(seed).integers(0, 256, region.array.shape, np.uint8)
    return region


def expected(region, src: list[int], first_token: int, num_dst: int, dst_block_bytes: int) -> list[str]:
    """Each layer's checksum of what the dst blocks must hold: the src blocks' tokens from `first_token` on,
    token after token, zero past their end."""
    token_bytes = 64
    sums = []
    for layer in range(region.array.shape[0]):
        pieces = []
        for kv in (0, 1):
            tokens = region.array[layer, kv, src].reshape(-1)[first_token * token_bytes:]
            out = np.zeros(num_dst * dst_block_bytes, np.uint8)
            take = min(tokens.size, out.size)
            out[:take] = tokens[:take]
            pieces.append(out)
        sums.append(str(layer_checksum(iter(pieces))))
    return sums


@pytest.mark.parametrize("src_block_size,num_src,num_dst,offset", [
    (2, 9, 5, 0),     # smaller source blocks: 18 tokens into 5 blocks of 4 (the last one half padding)
    (8, 5, 9, 4),     # larger source blocks, starting half-way into the first: 36 tokens into 9 blocks of 4
    (8, 3, 5, 0),     # more dst slots than src tokens: 24 tokens into 5 blocks of 4 (4 slots zeroed)
])
def test_rechunked_transfer_lands_the_same_tokens(backend, kv_pool, peers, src_block_size, num_src, num_dst,
                                                   offset):
    peer = peers(backend)
    layout = src_layout(src_block_size)
    region = filled(layout, kv_pool, seed=src_block_size)
    src = np.random.default_rng(5).permutation(SRC_BLOCKS)[:num_src].tolist()
    dst = [100 + 3 * i for i in range(num_dst)]  # scattered on the receiver too
    tid = f"rechunk-{backend}-{kv_pool}-{src_block_size}-{offset}-{num_dst}"
    peer.call("expect", tid=tid, blocks=dst, lease=20)

    async def run():
        sender = Sender(region, layout, backends=[backend], force=backend)
        try:
            transfer = await sender.open(peer.descriptor, tid, dst, timeout=10, src_token_offset=offset)
            for layer in range(layout.num_layers):
                await transfer.send_layer(layer, src)
            stats = await transfer.commit()
            assert sender.num_open_transfers == 0 and sender.num_staging_slots_busy == 0
            return stats
        finally:
            await sender.close()

    stats = asyncio.run(run())
    assert stats.backend == backend and stats.blocks == num_dst
    assert peer.call("wait", tid=tid, timeout=10)["stats"]["bytes"] == stats.bytes
    want = expected(region, src, offset, num_dst, peer.descriptor.layout.block_size * 64)
    assert peer.call("digest", blocks=dst)["checksums"] == want
    assert peer.call("records")["n"] == 0


@pytest.mark.parametrize("field,value", [("num_kv_heads", 1), ("dtype", "bfloat16"), ("model_id", "other")])
def test_unmappable_layout_is_refused_naming_what_differs(backend, kv_pool, peers, field, value):
    peer = peers(backend)
    layout = src_layout(8, **{field: value})
    if field == "num_kv_heads":
        layout.head_dim = 16  # the same bytes per token: still not the same heads
    region = filled(layout, kv_pool, seed=1)

    async def run():
        sender = Sender(region, layout, backends=[backend], force=backend)
        try:
            with pytest.raises(LayoutMismatch, match=field):
                await sender.open(peer.descriptor, "never", [1, 2], timeout=5)
            assert sender.num_open_transfers == 0 and sender.num_staging_slots_busy == 0
        finally:
            await sender.close()

    asyncio.run(run())


def test_aborted_rechunked_transfer_gives_its_staging_back(backend, kv_pool, peers):
    peer = peers(backend)
    layout = src_layout(2)
    region = filled(layout, kv_pool, seed=2)
    peer.call("expect", tid=f"rechunk-abort-{kv_pool}", blocks=[7, 8, 9], lease=20)

    async def run():
        sender = Sender(region, layout, backends=[backend], force=backend)
        try:
            transfer = await sender.open(peer.descriptor, f"rechunk-abort-{kv_pool}", [7, 8, 9], timeout=10)
            await transfer.send_layer(0, list(range(6)))
            assert sender.num_staging_slots_busy >= 3
            await transfer.abort("test")
            assert sender.num_open_transfers == 0 and sender.num_staging_slots_busy == 0
        finally:
            await sender.close()

    asyncio.run(run())
