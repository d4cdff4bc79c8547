"""Loading a model for the engine: weights, tokenizer, and a KV pool sized to a byte budget or given storage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kvmesh.services.engine.dtype_choice import resolve_dtype
from kvmesh.services.engine.errors import InvalidRequestError
from kvmesh.services.engine.kv_cache import KVCache, dtype_name
from kvmesh.services.engine.gemma import GEMMA_ARCHITECTURES, GemmaModel
from kvmesh.services.engine.model import LlamaModel
from kvmesh.services.engine.tp import start_tensor_parallel
from kvmesh.services.engine.tp_load import rank_layout, whole_layout
from kvmesh.services.engine.tp_shard import check_tp_size
from kvmesh.services.engine.weights import load_config, model_id
from kvmesh.services.kv_identity import KVLayout

DEFAULT_KV_CACHE_BYTES = 512 * 2**20


def pool_num_blocks(layout: KVLayout, max_model_len: int, max_num_seqs: int,
                    kv_cache_bytes: int | None = None) -> int:
    """Blocks of a KV pool of `kv_cache_bytes`, else enough for max_num_seqs full contexts within
    DEFAULT_KV_CACHE_BYTES (at least one full context)."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes // layout.block_bytes
    wanted = layout.num_blocks_for(max_model_len) * max_num_seqs
    return max(min(wanted, DEFAULT_KV_CACHE_BYTES // layout.block_bytes), layout.num_blocks_for(max_model_len) + 1)


def model_class(path: str | Path) -> type[LlamaModel]:
    """The forward-pass class of the checkpoint at `path`, by its architecture."""
    return GemmaModel if load_config(path).architecture in GEMMA_ARCHITECTURES else LlamaModel


@dataclass
class SharedPoolMemory:
    """KV pool memory that other processes can map: the array, and the file that backs it (e.g. under /dev/shm).
    A `kv_storage` function may return one so that tensor-parallel ranks share the pool with the transports."""

    array: np.ndarray
    path: str


def load_model(path: str | Path, dtype: str, device: str, block_size: int, num_blocks: int | None,
               kv_cache_bytes: int | None, max_num_seqs: int,
               kv_storage: np.ndarray | Callable[[int, int, int], np.ndarray | SharedPoolMemory] | None,
               tensor_parallel_size: int = 1):
    """(model, tokenizer, KV pool) of a local HF checkpoint folder; the pool sized by num_blocks, else by the
    given storage, else by kv_cache_bytes (see `pool_num_blocks`). dtype "auto" follows the device and the
    checkpoint (see `dtype_choice`). With tensor_parallel_size N > 1 the model runs on N ranks (tp.py): this
    process is rank 0; on the CPU the ranks share one pool of whole-head blocks (tp_load.py), on CUDA each
    rank's own pool holds 1/N of the KV heads."""
    from transformers import AutoTokenizer

    config = load_config(path)
    check_tp_size(config, tensor_parallel_size)
    dtype = resolve_dtype(dtype, config.dtype, device)
    own_pools = tensor_parallel_size > 1 and str(device) != "cpu"
    if tensor_parallel_size == 1:
        model = model_class(path).from_path(path, dtype, device)
        cfg = model.config
        layout = KVLayout(model_id(path), dtype_name(model.dtype), block_size, cfg.num_layers, cfg.num_kv_heads,
                          cfg.head_dim)
    else:
        model, cfg = None, config
        layout = (rank_layout(path, dtype, block_size, tensor_parallel_size) if own_pools
                  else whole_layout(path, dtype, block_size))
    if kv_storage is not None and not callable(kv_storage):
        num_blocks = int(kv_storage.shape[2])
    elif num_blocks is None:
        num_blocks = pool_num_blocks(layout, cfg.max_position_embeddings, max_num_seqs, kv_cache_bytes)
    if num_blocks < 1:
        raise InvalidRequestError(f"the KV cache needs at least one block; got {num_blocks}")
    storage, shared = _pool_memory(kv_storage, layout, num_blocks, tensor_parallel_size > 1 and not own_pools)
    kv = KVCache(layout, num_blocks, device, storage)
    if model is None:
        model = start_tensor_parallel(path, dtype, device, tensor_parallel_size, block_size, num_blocks, shared)
    return model, AutoTokenizer.from_pretrained(str(path)), kv


def _pool_memory(kv_storage, layout: KVLayout, num_blocks: int, share: bool):
    """(the pool's memory or None, what follower ranks map it by or None). The caller places the pool once its
    size is known when kv_storage is a function; ranks that share the pool need memory they can map: a
    SharedPoolMemory from the caller, else torch shared memory allocated here."""
    if callable(kv_storage):
        kv_storage = kv_storage(layout.num_layers, num_blocks, layout.block_nbytes)
    if isinstance(kv_storage, SharedPoolMemory):
        return kv_storage.array, (kv_storage.path if share else None)
    if not share:
        return kv_storage, None
    if kv_storage is not None:
        raise InvalidRequestError("tensor parallelism on the CPU needs the KV pool in memory its ranks can map: "
                                  "give no kv_storage (the engine allocates shared memory) or a SharedPoolMemory")
    memory = torch.zeros((layout.num_layers, 2, num_blocks, layout.block_nbytes), dtype=torch.uint8).share_memory_()
    return memory.numpy(), memory
