"""The paged KV cache's layout, byte views, block export/import, allocator and chained hashes."""

import numpy as np
import pytest
import torch

from kvmesh.services.engine.errors import InvalidRequestError, OutOfBlocksError
from kvmesh.services.engine.kv_cache import BlockAllocator, KVCache
from kvmesh.services.kv_identity import KVLayout, block_hashes

LAYOUT = KVLayout("m-abc", "bfloat16", 16, 3, 2, 8)


def test_block_nbytes_is_one_block_of_one_layers_k():
    assert LAYOUT.block_nbytes == 16 * 2 * 8 * 2
    kv = KVCache(LAYOUT, 5)
    assert kv.pool.shape == (3, 2, 5, 16, 2, 8)
    assert kv.pool[1, 0, 2].numel() * kv.pool.element_size() == LAYOUT.block_nbytes
    assert kv.byte_view().shape == (3, 2, 5, LAYOUT.block_nbytes)


def test_external_storage_is_shared_zero_copy():
    storage = np.zeros((3, 2, 4, LAYOUT.block_nbytes), dtype=np.uint8)
    kv = KVCache(LAYOUT, 4, storage=storage)
    kv.pool[2, 1, 3].fill_(1.0)  # V of layer 2, block 3
    ones = torch.ones(16, 2, 8, dtype=torch.bfloat16).view(torch.uint8).numpy().ravel()
    assert np.array_equal(storage[2, 1, 3], ones)
    assert not storage[2, 0, 3].any() and not storage[2, 1, 2].any()
    assert np.shares_memory(kv.byte_view(), storage)


def test_storage_of_wrong_shape_is_refused():
    with pytest.raises(InvalidRequestError, match="uint8"):
        KVCache(LAYOUT, 4, storage=np.zeros((3, 2, 5, LAYOUT.block_nbytes), dtype=np.uint8))


def test_export_then_import_moves_exact_bytes():
    src, dst = KVCache(LAYOUT, 6), KVCache(LAYOUT, 6)
    src.pool.copy_(torch.randn(src.pool.shape).to(torch.bfloat16))
    data = src.export_blocks([4, 1])
    assert data.shape == (3, 2, 2, LAYOUT.block_nbytes) and data.flags.c_contiguous
    dst.import_blocks([0, 5], data)
    assert torch.equal(dst.pool[:, :, 0], src.pool[:, :, 4])
    assert torch.equal(dst.pool[:, :, 5], src.pool[:, :, 1])
    assert not dst.pool[:, :, 1:5].any()
    with pytest.raises(InvalidRequestError, match="shape"):
        dst.import_blocks([0], data)


def test_a_head_slice_writes_its_heads_of_the_whole_pool_in_place():
    kv = KVCache(LAYOUT, 4)
    second = kv.head_slice(1, 2)  # tensor-parallel rank 1 of 2: KV head 1
    assert second.layout.num_kv_heads == 1 and second.num_blocks == 4
    k, v = second.layer(2)
    assert k.shape == (4, 16, 1, 8)
    k.view(-1, 1, 8).index_copy_(0, torch.tensor([17, 18]), torch.ones(2, 1, 8, dtype=torch.bfloat16))
    assert kv.pool[2, 0, 1, 1:3, 1].eq(1).all()  # slots 17, 18: block 1, offsets 1 and 2, head 1
    assert kv.pool.count_nonzero() == 2 * 8  # nothing else, and head 0 untouched
    for rank, size in ((2, 2), (0, 3), (-1, 2)):
        with pytest.raises(InvalidRequestError, match="even share of 2 KV heads"):
            kv.head_slice(rank, size)


def test_allocator_refcounts_shared_blocks():
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    assert alloc.num_free_blocks == 1 and not alloc.can_allocate(2)
    alloc.incref(a[:2])  # a second sequence shares the prefix
    alloc.free(a)
    assert alloc.num_free_blocks == 2  # the shared two are still held
    alloc.free(a[:2])
    assert alloc.num_free_blocks == alloc.num_total_blocks == 4
    with pytest.raises(InvalidRequestError):
        alloc.free([a[0]])
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(5)


def test_block_hash_covers_every_earlier_token_and_the_salt():
    ids = list(range(40))
    h = block_hashes(ids, 16, b"model-a")
    assert len(h) == 2 and all(isinstance(x, bytes) for x in h)  # the partial third block has no hash
    changed = block_hashes([99] + ids[1:], 16, b"model-a")
    assert changed[0] != h[0] and changed[1] != h[1]  # block 1's hash covers block 0's tokens
    assert block_hashes(ids, 16, b"model-b")[0] != h[0]
    assert block_hashes(ids[:32], 16, b"model-a") == h
