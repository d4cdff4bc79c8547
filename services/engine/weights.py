"""Reading a local HF checkpoint of the Llama family (with Qwen3, Phi-3, Mixtral, Qwen2-MoE): config.json into
`ModelConfig`, safetensors into tensors.

Both config dialects are understood: transformers < 5 (`rope_theta`, `rope_scaling`) and 5.x
(`rope_parameters = {"rope_theta": ..., "rope_type": ...}`). Weights are read with safetensors directly
(memory-mapped), never through transformers' modules.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

import torch

from kvmesh.services.engine.errors import UnsupportedModelError
from kvmesh.services.engine.kv_cache import DTYPES
from kvmesh.services.engine.moe import MoEConfig, moe_config

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
                 "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Families whose configs apply `sliding_window` whenever it is set (the Qwen ones only with use_sliding_window).
WINDOW_BY_DEFAULT = ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """What the forward pass needs to know about a checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str
    rope_theta: float
    rope_type: str = "default"
    rope_params: dict = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    partial_rotary_factor: float = 1.0  # RoPE rotates the leading int(head_dim * factor) dims (Phi-3's configs)
    moe: MoEConfig | None = None  # Mixtral, Qwen2-MoE

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)


def _rope(raw: dict) -> tuple[float, str, dict]:
    params = raw.get("rope_parameters") or {}
    if "full_attention" in params:  # per layer type (Gemma 3): the global layers' RoPE is the model's
        params = params["full_attention"] or {}
    scaling = raw.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return float(theta), rope_type, merged


def _eos_ids(raw: dict, folder: Path) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [raw]
    gen = folder / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()))
    for src in sources:
        value = src.get("eos_token_id")
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return tuple(ids)


def load_config(folder: str | Path) -> ModelConfig:
    """Parse `folder/config.json`; raise UnsupportedModelError for anything outside the Llama family."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"no config.json in {folder}; expected a local HF checkpoint folder")
    raw = json.loads(path.read_text())
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else raw.get("model_type", "?")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported; kvmesh runs {', '.join(ARCHITECTURES)}")
    max_positions = raw.get("max_position_embeddings", 2048)
    window = raw.get("sliding_window")
    if window and raw.get("use_sliding_window", arch in WINDOW_BY_DEFAULT):
        # Full attention equals sliding-window attention while the context fits in the window.
        max_positions = min(max_positions, int(window))
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise UnsupportedModelError(f"checkpoint dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    theta, rope_type, rope_params = _rope(raw)
    heads = raw["num_attention_heads"]
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dtype=dtype,
        rope_theta=theta,
        rope_type=rope_type,
        rope_params=rope_params,
        eos_token_ids=_eos_ids(raw, folder),
        qk_norm=arch == "Qwen3ForCausalLM",
        partial_rotary_factor=float(rope_params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))),
        moe=moe_config(raw, arch, raw["num_hidden_layers"]),
    )


def model_id(folder: str | Path) -> str:
    """Folder name plus a short hash of config.json, so two different models never share KV."""
    folder = Path(folder).resolve()
    digest = hashlib.blake2b((folder / "config.json").read_bytes(), digest_size=6).hexdigest()
    return f"{folder.name}-{digest}"


def inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies (float32) of the rotary dims, with linear or llama3 scaling applied."""
    dim = config.rotary_dim
    freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    p = config.rope_params
    if config.rope_type == "linear":
        return freq / float(p["factor"])
    if config.rope_type == "llama3":
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old_len / low, freq / factor, freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    return freq


def load_weights(folder: str | Path, config: ModelConfig, dtype: torch.dtype, device: str,
                 read: Callable[[str, object, str], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's *.safetensors files, names without the `model.` prefix. `read(key, file,
    name)` reads one from an open safetensors file (a tensor-parallel rank reads only its slice); whole by default."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"no *.safetensors files in {folder}")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                key = name[len("model."):] if name.startswith("model.") else name
                tensor = read(key, f, name) if read is not None else f.get_tensor(name)
                out[key] = tensor.to(device=device, dtype=dtype)
    if "lm_head.weight" not in out:
        if not config.tie_word_embeddings and "embed_tokens.weight" not in out:
            raise UnsupportedModelError("checkpoint has neither lm_head.weight nor tied embeddings")
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
