"""Loading a model for the engine: weights, tokenizer, and a KV pool sized to a byte budget or given storage."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from kvmesh.services.engine.dtype_choice import resolve_dtype
from kvmesh.services.engine.errors import InvalidRequestError
from kvmesh.services.engine.kv_cache import KVCache, dtype_name
from kvmesh.services.engine.gemma import GEMMA_ARCHITECTURES, GemmaModel
from kvmesh.services.engine.model import LlamaModel
from kvmesh.services.engine.tp import start_tensor_parallel
from kvmesh.services.engine.tp_load import rank_layout
from kvmesh.services.engine.tp_shard import check_tp_size, shard_config
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


def load_model(path: str | Path, dtype: str, device: str, block_size: int, num_blocks: int | None,
               kv_cache_bytes: int | None, max_num_seqs: int,
               kv_storage: np.ndarray | Callable[[int, int, int], np.ndarray] | None, tensor_parallel_size: int = 1):
    """(model, tokenizer, KV pool) of a local HF checkpoint folder; the pool sized by num_blocks, else by the
    given storage, else by kv_cache_bytes (see `pool_num_blocks`). dtype "auto" follows the device and the
    checkpoint (see `dtype_choice`). With tensor_parallel_size N > 1 the model runs on N ranks (tp.py): this
    process is rank 0, and the pool (each rank's alike) holds 1/N of the KV heads."""
    from transformers import AutoTokenizer

    config = load_config(path)
    check_tp_size(config, tensor_parallel_size)
    dtype = resolve_dtype(dtype, config.dtype, device)
    if tensor_parallel_size == 1:
        model = model_class(path).from_path(path, dtype, device)
        cfg = model.config
        layout = KVLayout(model_id(path), dtype_name(model.dtype), block_size, cfg.num_layers, cfg.num_kv_heads,
                          cfg.head_dim)
    else:
        model, layout = None, rank_layout(path, dtype, block_size, tensor_parallel_size)
        cfg = shard_config(config, tensor_parallel_size)
    if kv_storage is not None and not callable(kv_storage):
        num_blocks = int(kv_storage.shape[2])
    elif num_blocks is None:
        num_blocks = pool_num_blocks(layout, cfg.max_position_embeddings, max_num_seqs, kv_cache_bytes)
    if num_blocks < 1:
        raise InvalidRequestError(f"the KV cache needs at least one block; got {num_blocks}")
    if callable(kv_storage):  # the caller places the pool (e.g. in shared memory) once its size is known
        kv_storage = kv_storage(cfg.num_layers, num_blocks, layout.block_nbytes)
    kv = KVCache(layout, num_blocks, device, kv_storage)
    if model is None:
        model = start_tensor_parallel(path, dtype, device, tensor_parallel_size, block_size, num_blocks)
    return model, AutoTokenizer.from_pretrained(str(path)), kv
