"""What one tensor-parallel rank loads (its shard of the weights, its KV-head slice of the pool), and the follower
ranks' process body.

On the CPU the ranks share ONE pool of whole-head blocks (shared memory the driver allocates), each rank reading
and writing its head slice through a strided view (`KVCache.head_slice`): the driver's pool is then the whole KV,
so the transports, the cache and every peer see whole-head blocks whatever the tensor-parallel degree of either
side, and P TP=2 -> D TP=1 needs neither a gather nor a re-shard. On CUDA each rank's pool is its own device
memory (`rank_layout`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kvmesh.services.engine.kv_cache import DTYPES, KVCache
from kvmesh.services.engine.model import LlamaModel
from kvmesh.services.engine.tp_comm import (all_reduce, backend_for, init_group, rank_device, receive_step,
                                            watch_parent)
from kvmesh.services.engine.tp_shard import load_shard_weights, shard_config
from kvmesh.services.engine.tp_wire import decode_batch
from kvmesh.services.engine.weights import load_config, model_id
from kvmesh.services.kv_identity import KVLayout


def load_rank_model(path: str | Path, dtype: str, device: str, rank: int, size: int) -> LlamaModel:
    """Rank `rank` of `size`'s model: its shard of every layer, all-reducing its partial outputs."""
    config = load_config(path)
    local = shard_config(config, size)
    weights = load_shard_weights(path, config, DTYPES[dtype], device, rank, size)
    model = LlamaModel(local, weights, DTYPES[dtype], device, local.max_position_embeddings)
    model.all_reduce = all_reduce
    return model


def rank_layout(path: str | Path, dtype: str, block_size: int, size: int) -> KVLayout:
    """The KV layout of one rank's own pool (ranks on separate devices): the checkpoint's layers and head_dim,
    1/size of its KV heads."""
    local = shard_config(load_config(path), size)
    return KVLayout(model_id(path), dtype, block_size, local.num_layers, local.num_kv_heads, local.head_dim)


def whole_layout(path: str | Path, dtype: str, block_size: int) -> KVLayout:
    """The KV layout of a pool the ranks share: every KV head of the checkpoint."""
    config = load_config(path)
    return KVLayout(model_id(path), dtype, block_size, config.num_layers, config.num_kv_heads, config.head_dim)


def rank_pool(path: str, dtype: str, device: str, block_size: int, num_blocks: int, rank: int, size: int,
              shared: torch.Tensor | str | None) -> KVCache:
    """A follower's KV pool: its head slice of the pool the ranks share (`shared`: the pool's uint8 bytes as a
    torch shared-memory tensor, or the path of the file that backs it), else a pool of its own on its device."""
    if shared is None:
        return KVCache(rank_layout(path, dtype, block_size, size), num_blocks, device)
    layout = whole_layout(path, dtype, block_size)
    shape = (layout.num_layers, 2, num_blocks, layout.block_nbytes)
    memory = np.memmap(shared, dtype=np.uint8, mode="r+", shape=shape) if isinstance(shared, str) else shared.numpy()
    return KVCache(layout, num_blocks, "cpu", memory).head_slice(rank, size)


def follower_main(path: str, dtype: str, device: str, block_size: int, num_blocks: int, rank: int, size: int,
                  port: int, parent_pid: int, threads: int, shared: torch.Tensor | str | None = None) -> None:
    """A follower rank's life: join the group, load its shard and KV pool, run every step the driver sends."""
    import torch.distributed as dist

    watch_parent(parent_pid)
    torch.set_num_threads(threads)
    device = rank_device(device, rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    model = load_rank_model(path, dtype, device, rank, size)  # a rank that cannot load exits before joining
    kv = rank_pool(path, dtype, device, block_size, num_blocks, rank, size, shared)
    init_group(device, rank, size, port)
    try:
        comm = device if backend_for(device) == "nccl" else "cpu"
        while (payload := receive_step(comm)) is not None:
            model.forward(decode_batch(payload, device), kv)
    finally:
        dist.destroy_process_group()
