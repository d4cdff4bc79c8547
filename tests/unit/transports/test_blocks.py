"""Run splitting and the checksum order both sides must agree on."""

import numpy as np
import pytest

from kvmesh.transports.blocks import as_block_ids, dst_checksums, dst_runs, layer_runs, paired_runs, src_checksum


def test_runs_split_where_either_side_jumps():
    src, dst = np.array([4, 5, 6, 9, 10, 11]), np.array([0, 1, 2, 3, 7, 8])
    assert paired_runs(src, dst) == [(4, 0, 3), (9, 3, 1), (10, 7, 2)]
    assert dst_runs(dst) == [(0, 4), (7, 2)]


def test_sender_and_receiver_checksums_agree_after_a_scattered_copy():
    rng = np.random.default_rng(0)
    src_pool = rng.integers(0, 256, (3, 2, 50, 16), np.uint8)
    dst_pool = np.zeros_like(src_pool)
    src, dst = rng.permutation(50)[:20], np.concatenate([np.arange(10, 20), rng.permutation(10)])
    sums = []
    for layer in range(3):
        rs = layer_runs(src_pool, layer, src, dst)
        for r in rs:
            dst_pool[r.layer, r.kv, r.dst_start:r.dst_start + r.num_blocks] = r.src
        sums.append(src_checksum(rs))
    assert dst_checksums(dst_pool, dst, 3) == sums
    dst_pool[1, 1, dst[7], 3] ^= 1
    assert dst_checksums(dst_pool, dst, 3)[1] != sums[1]


@pytest.mark.parametrize("ids", [[], [-1], [10], [[1, 2]]])
def test_bad_block_ids_are_rejected(ids):
    with pytest.raises(ValueError):
        as_block_ids(ids, 10, "ids")
