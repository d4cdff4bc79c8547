"""Tensor-parallel sharding of a Llama-family checkpoint: which slice of each weight a rank holds, read straight
from the safetensors files (a rank never loads the other ranks' slices).

Megatron's split, as vLLM's and SGLang's: q/k/v and gate/up are column-parallel (rank r holds heads
[r*H/N, (r+1)*H/N) of q, the same share of the KV heads of k and v, and 1/N of the MLP's intermediate columns);
o_proj and down_proj are row-parallel (the matching input columns), so each rank's output is a partial sum
that one all-reduce completes. Norms, embeddings and lm_head are replicated. A rank's `ModelConfig` is the
checkpoint's with its local head and intermediate counts, so the forward pass and the KV pool (each rank's
holds its KV-head slice) need no other change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kvmesh.services.engine.errors import UnsupportedModelError
from kvmesh.services.engine.weights import ModelConfig, load_weights

TP_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# weight name suffix -> (split dim, which count it is split by)
_SPLITS = {
    "self_attn.q_proj.weight": (0, "q"), "self_attn.q_proj.bias": (0, "q"),
    "self_attn.k_proj.weight": (0, "kv"), "self_attn.k_proj.bias": (0, "kv"),
    "self_attn.v_proj.weight": (0, "kv"), "self_attn.v_proj.bias": (0, "kv"),
    "self_attn.o_proj.weight": (1, "q"),
    "mlp.gate_proj.weight": (0, "mlp"), "mlp.up_proj.weight": (0, "mlp"),
    "mlp.down_proj.weight": (1, "mlp"),
}


def check_tp_size(config: ModelConfig, size: int) -> None:
    """Raise UnsupportedModelError unless `size` ranks can split this model evenly."""
    if size < 1:
        raise UnsupportedModelError(f"tensor_parallel_size must be at least 1, got {size}")
    if size == 1:
        return
    if config.architecture not in TP_ARCHITECTURES:
        raise UnsupportedModelError(f"tensor parallelism runs {', '.join(TP_ARCHITECTURES)} for now; "
                                    f"{config.architecture} needs --tensor-parallel-size 1")
    counts = {"KV heads": config.num_kv_heads, "attention heads": config.num_heads,
              "intermediate size": config.intermediate_size}
    for what, count in counts.items():
        if count % size:
            divisors = [d for d in range(1, config.num_kv_heads + 1)
                        if all(c % d == 0 for c in counts.values())]
            raise UnsupportedModelError(
                f"--tensor-parallel-size {size} does not divide the model's {what} ({count}); "
                f"choose one of {', '.join(map(str, divisors))}")


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """One rank's view of the model: its share of the heads and of the MLP's intermediate columns."""
    return dataclasses.replace(config, num_heads=config.num_heads // size,
                               num_kv_heads=config.num_kv_heads // size,
                               intermediate_size=config.intermediate_size // size)


def _split(name: str, config: ModelConfig, size: int) -> tuple[int, int] | None:
    """(dim, rows per rank) for a sharded weight; None for a replicated one."""
    for suffix, (dim, kind) in _SPLITS.items():
        if name.startswith("layers.") and name.endswith(suffix):
            total = {"q": config.num_heads * config.head_dim, "kv": config.num_kv_heads * config.head_dim,
                     "mlp": config.intermediate_size}[kind]
            return dim, total // size
    return None


def load_shard_weights(folder: str | Path, config: ModelConfig, dtype: torch.dtype, device: str, rank: int,
                       size: int) -> dict[str, torch.Tensor]:
    """Rank `rank` of `size`'s tensors (names without the `model.` prefix), reading only its slices."""

    def read(key: str, f, name: str) -> torch.Tensor:
        split = _split(key, config, size)
        if split is None:
            return f.get_tensor(name)
        dim, per_rank = split
        piece = slice(rank * per_rank, (rank + 1) * per_rank)
        return f.get_slice(name)[piece] if dim == 0 else f.get_slice(name)[:, piece]

    return load_weights(folder, config, dtype, device, read=read)
