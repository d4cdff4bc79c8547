"""Decode tokens of very different context lengths are attended in length groups; the logits must not change."""

import pytest
import torch
from engine_helpers import prompts_of_lengths

from kvmesh.services.engine.batch import Chunk, build_batch, group_by_length
from kvmesh.services.engine.kv_cache import KVCache
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.engine.model import LlamaModel


def test_group_by_length_splits_only_where_padding_costs_more_than_a_group():
    assert group_by_length([10, 10, 10], cost=100) == [3]
    assert group_by_length([10, 10, 1000, 1000], cost=100) == [2, 4]
    assert group_by_length([5], cost=0) == [1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_decode_matches_each_sequence_alone(model_dir, dtype):
    model = LlamaModel.from_path(model_dir("llama"), dtype)
    c = model.config
    kv = KVCache(KVLayout("t", dtype, 16, c.num_layers, c.num_kv_heads, c.head_dim), 160)
    lengths = [5, 700, 9, 650, 300]
    prompts = prompts_of_lengths(lengths, c.vocab_size, seed=3)
    tables, next_block = [], 159
    for p in prompts:  # descending, non-contiguous block ids per sequence
        n = -(-(len(p) + 1) // 16)
        tables.append(list(range(next_block, next_block - n, -1)))
        next_block -= n
    for p, t in zip(prompts, tables):
        model.forward(build_batch([Chunk(p[:-1], 0, t)], 16), kv)
    batch = build_batch([Chunk(p[-1:], len(p) - 1, t) for p, t in zip(prompts, tables)], 16)
    assert len(batch.decode_groups) >= 2
    together = model.forward(batch, kv)
    alone = torch.cat([model.forward(build_batch([Chunk(p[-1:], len(p) - 1, t)], 16), kv)
                       for p, t in zip(prompts, tables)])
    rows = torch.tensor(batch.chunk_rows)
    tol = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(together[rows].float(), alone.float(), atol=tol, rtol=0)
