"""The Gemma 2 and Gemma 3 (text) forward pass over the paged KV cache.

What differs from the Llama family (`model.LlamaModel`, whose loading, projections and RoPE this reuses):
norms scale by (1 + w) in float32, the embedding is scaled by sqrt(hidden_size) in the model dtype, the MLP is
GELU-tanh, each block's attention and MLP outputs are normed again before the residual add, attention scales by
query_pre_attn_scalar, and layers alternate local (sliding-window) and global attention. Gemma 2 soft-caps
attention and final logits; Gemma 3 norms q and k per head and gives local layers their own RoPE base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kvmesh.services.engine.batch import StepBatch
from kvmesh.services.engine.errors import UnsupportedModelError
from kvmesh.services.engine.gemma_attention import AttentionSpec, StepMasks, paged_attention, step_masks
from kvmesh.services.engine.kv_cache import DTYPES, KVCache
from kvmesh.services.engine.linear import Linear
from kvmesh.services.engine.model import LlamaModel, apply_rope
from kvmesh.services.engine.weights import ModelConfig, inv_freq, load_config, load_weights

GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class GemmaSpec:
    """Gemma's settings beyond `ModelConfig`, read from config.json."""

    query_pre_attn_scalar: float
    attn_softcap: float | None
    final_softcap: float | None
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]  # per layer: local (sliding-window) attention
    local_rope_theta: float | None  # Gemma 3: the local layers' RoPE base (None: they share the global RoPE)


def _layer_types(raw: dict, gemma3: bool) -> list[str]:
    types = raw.get("layer_types")
    if types is None:  # configs older than layer_types: a repeating pattern ending in a global layer
        pattern = int(raw.get("sliding_window_pattern", 6)) if gemma3 else 2
        types = [LAYER_TYPES[(i + 1) % pattern == 0] for i in range(raw["num_hidden_layers"])]
    unknown = set(types) - set(LAYER_TYPES)
    if unknown or len(types) != raw["num_hidden_layers"]:
        raise UnsupportedModelError(f"layer_types {types!r}: need one of {', '.join(LAYER_TYPES)} per layer")
    return types


def load_gemma_spec(folder: str | Path) -> GemmaSpec:
    """Parse Gemma's own settings from `folder/config.json`; refuse variants the forward does not implement."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    gemma3 = (raw.get("architectures") or [""])[0] == "Gemma3ForCausalLM"
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModelError(f"Gemma activation {act!r} is not supported; kvmesh runs gelu_pytorch_tanh")
    if raw.get("attention_bias"):
        raise UnsupportedModelError("Gemma with attention_bias is not supported (no released Gemma has biases)")
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError("bidirectional Gemma attention (embedding models) is not supported")
    local_theta = None
    if gemma3:
        local = (raw.get("rope_parameters") or {}).get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"local-layer rope type {local['rope_type']!r} is not supported")
        local_theta = float(local.get("rope_theta", raw.get("rope_local_base_freq", 10000.0)))
    window = raw.get("sliding_window")
    return GemmaSpec(
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", 256)),
        attn_softcap=raw.get("attn_logit_softcapping"),
        final_softcap=raw.get("final_logit_softcapping"),
        sliding_window=int(window) if window else None,
        sliding_layers=tuple(t == "sliding_attention" for t in _layer_types(raw, gemma3)),
        local_rope_theta=local_theta,
    )


def gemma_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm, all in float32: x * rsqrt(mean(x^2) + eps) * (1 + w); `scale` is 1 + w, precomputed."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * scale).to(x.dtype)


@dataclass
class GemmaLayer:
    """One Gemma decoder layer's weights (fused projections; norm scales as 1 + w in float32)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    attention: AttentionSpec
    sliding: bool

    def __post_init__(self):
        self.qkv_proj = Linear(self.qkv)
        self.o_proj, self.gate_up_proj, self.down_proj = Linear(self.o), Linear(self.gate_up), Linear(self.down)


def _scale(w: torch.Tensor | None) -> torch.Tensor | None:
    return None if w is None else 1.0 + w.float()


class GemmaModel(LlamaModel):
    """Weights and forward of one Gemma 2 or Gemma 3 (text) checkpoint."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
                 max_positions: int, spec: GemmaSpec):
        self.spec = spec
        super().__init__(config, weights, dtype, device, max_positions)
        self.final_norm = _scale(self.norm)
        # HF scales in the model dtype: sqrt(hidden_size) rounded to it (bfloat16: sqrt(3072) becomes 55.5)
        self.normalizer = torch.tensor(config.hidden_size ** 0.5, device=device).to(dtype)
        self._local_cos, self._local_sin = self._cos, self._sin
        if spec.local_rope_theta is not None:
            local = replace(config, rope_theta=spec.local_rope_theta, rope_type="default", rope_params={})
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq(local))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._local_cos, self._local_sin = emb.cos().to(device), emb.sin().to(device)

    @classmethod
    def from_path(cls, path: str | Path, dtype: str = "auto", device: str = "cpu",
                  max_positions: int | None = None) -> "GemmaModel":
        """Load config and safetensors weights from a local HF folder; dtype "auto" = the checkpoint's own."""
        config = load_config(path)
        if config.architecture not in GEMMA_ARCHITECTURES:
            raise UnsupportedModelError(f"{config.architecture} is not a Gemma architecture")
        name = config.dtype if dtype == "auto" else dtype
        if name not in DTYPES:
            raise UnsupportedModelError(f"dtype {dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
        weights = load_weights(path, config, DTYPES[name], device)
        return cls(config, weights, DTYPES[name], device, max_positions or config.max_position_embeddings,
                   load_gemma_spec(path))

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> GemmaLayer:
        p, spec = f"layers.{i}.", self.spec
        sliding = spec.sliding_layers[i] and spec.sliding_window is not None
        try:
            return GemmaLayer(
                input_norm=_scale(w[p + "input_layernorm.weight"]),
                qkv=torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
                o=w[p + "self_attn.o_proj.weight"],
                post_attn_norm=_scale(w[p + "post_attention_layernorm.weight"]),
                pre_ff_norm=_scale(w[p + "pre_feedforward_layernorm.weight"]),
                post_ff_norm=_scale(w[p + "post_feedforward_layernorm.weight"]),
                gate_up=torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]),
                down=w[p + "mlp.down_proj.weight"],
                q_norm=_scale(w.get(p + "self_attn.q_norm.weight")),
                k_norm=_scale(w.get(p + "self_attn.k_norm.weight")),
                attention=AttentionSpec(spec.query_pre_attn_scalar ** -0.5, spec.attn_softcap,
                                        spec.sliding_window if sliding else None),
                sliding=sliding,
            )
        except KeyError as e:
            raise UnsupportedModelError(f"checkpoint is missing weight {e.args[0]!r}") from None

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: KVCache,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run one step: write the new K/V into the cache, return logits [len(batch.logits_index), vocab]."""
        h = self.embed[batch.input_ids] * self.normalizer
        kinds = {layer.sliding for layer in self.layers}
        masks = {s: step_masks(batch, self.spec.sliding_window if s else None, kv.layout.block_size) for s in kinds}
        ropes = {s: self._rope_at(batch.positions, s) for s in kinds}
        for i, layer in enumerate(self.layers):
            h = self._layer_forward(i, layer, h, batch, kv, ropes[layer.sliding], masks[layer.sliding], layer_hook)
        h = gemma_norm(h[batch.logits_index], self.final_norm, self.config.rms_norm_eps)
        logits = self.lm_head_proj(h)
        cap = self.spec.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _rope_at(self, positions: torch.Tensor, sliding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = (self._local_cos, self._local_sin) if sliding else (self._cos, self._sin)
        return cos[positions].to(self.dtype)[:, None, :], sin[positions].to(self.dtype)[:, None, :]

    def _layer_forward(self, i: int, layer: GemmaLayer, h: torch.Tensor, batch: StepBatch, kv: KVCache,
                       rope: tuple[torch.Tensor, torch.Tensor], masks: StepMasks,
                       layer_hook: Callable[[int], None] | None) -> torch.Tensor:
        cfg, n = self.config, h.shape[0]
        eps, heads, kv_heads, dim = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = gemma_norm(h, layer.input_norm, eps)
        q, k, v = layer.qkv_proj(x).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k, v = q.view(n, heads, dim), k.view(n, kv_heads, dim), v.reshape(n, kv_heads, dim)
        if layer.q_norm is not None:  # Gemma 3: per-head RMSNorm of q and k, before RoPE
            q, k = gemma_norm(q, layer.q_norm, eps), gemma_norm(k, layer.k_norm, eps)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_pool, v_pool = kv.layer(i)
        k_pool.view(-1, kv_heads, dim).index_copy_(0, batch.slots, k)
        v_pool.view(-1, kv_heads, dim).index_copy_(0, batch.slots, v)
        if layer_hook is not None:  # this layer's K/V are in the cache: the caller may ship them now
            layer_hook(i)
        attn = paged_attention(batch, q, k, v, k_pool, v_pool, masks, layer.attention, self.attention)
        h = h + gemma_norm(layer.o_proj(attn), layer.post_attn_norm, eps)
        x = gemma_norm(h, layer.pre_ff_norm, eps)
        gate, up = layer.gate_up_proj(x).chunk(2, dim=-1)
        return h + gemma_norm(layer.down_proj(F.gelu(gate, approximate="tanh") * up), layer.post_ff_norm, eps)


def tiny_hf_config(family: str, common: dict):
    """`kvmesh model init`'s config of "gemma2" or "gemma3": the real family's settings at the preset's shape,
    with a 16-token window so short tests cross it, and a query_pre_attn_scalar unlike head_dim so the scale
    is tested. Gemma 2 soft-caps attention and final logits (real values: 50, 30; smaller here so capping bites
    at these logits' size); Gemma 3 has a local RoPE base and linear-scaled global RoPE."""
    from transformers import Gemma2Config, Gemma3TextConfig

    head_dim = common["hidden_size"] // common["num_attention_heads"]
    shared = dict(common, head_dim=head_dim, query_pre_attn_scalar=head_dim // 2 + 8, sliding_window=16,
                  hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    if family == "gemma2":
        return Gemma2Config(**shared, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(common["num_hidden_layers"])]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
    return Gemma3TextConfig(**shared, layer_types=types, rope_parameters=rope)


def perturb_norms(model, std: float) -> None:
    """Draw Gemma's norm weights (HF initialises them to 0, i.e. a scale of exactly 1) so tests see (1 + w)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, std)
