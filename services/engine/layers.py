"""One decoder layer's weights, read from a checkpoint's per-family tensor names.

Every family comes out in one shape: q/k/v fused into one matmul, an optional per-head q/k RMSNorm (Qwen3),
and a feed-forward callable (`moe.SwiGLU`, or `moe.SparseMoE` for Mixtral and Qwen2-MoE). The names differ:

* Llama, Mistral, Qwen2, Qwen3: `self_attn.{q,k,v}_proj`, `mlp.{gate,up,down}_proj`; Qwen3 adds
  `self_attn.{q,k}_norm`.
* Phi-3: already fused, `self_attn.qkv_proj` and `mlp.gate_up_proj` (gate rows first, as ours).
* Mixtral: `block_sparse_moe.gate` (the router) and `block_sparse_moe.experts.E.{w1,w3,w2}` (gate, up, down);
  transformers 5's in-memory form, `mlp.experts.{gate_up_proj,down_proj}` stacked [E, ...], is read as well.
* Qwen2-MoE: `mlp.gate`, `mlp.experts.E.{gate,up,down}_proj`, `mlp.shared_expert.*`, `mlp.shared_expert_gate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvmesh.services.engine.errors import UnsupportedModelError
from kvmesh.services.engine.linear import Linear
from kvmesh.services.engine.moe import MoEConfig, SparseMoE, SwiGLU
from kvmesh.services.engine.weights import ModelConfig

Weights = dict[str, torch.Tensor]


@dataclass
class Layer:
    """One decoder layer: fused q/k/v (+ bias), optional q/k norms, o, the two norms, and the MLP."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    mlp: Callable[[torch.Tensor], torch.Tensor]
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    def __post_init__(self):
        self.qkv_proj, self.o_proj = Linear(self.qkv, self.qkv_bias), Linear(self.o)


def _qkv(w: Weights, p: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    fused = w.get(p + "self_attn.qkv_proj.weight")
    if fused is not None:
        return fused, w.get(p + "self_attn.qkv_proj.bias")
    qkv = torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
    biases = [w.get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
    return qkv, (torch.cat(biases) if all(b is not None for b in biases) else None)


def _swiglu(w: Weights, p: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> SwiGLU:
    """The SwiGLU whose weights are `p + {gate,up,down}.weight` (or a fused `p + gate_up_proj.weight`)."""
    fused = w.get(p + "gate_up_proj.weight")
    if fused is None:
        fused = torch.cat([w[p + gate + ".weight"], w[p + up + ".weight"]])
    return SwiGLU(fused, w[p + down + ".weight"])


def _experts(w: Weights, p: str, moe: MoEConfig) -> tuple[torch.Tensor, list[SwiGLU]]:
    """(router weight, experts) of one sparse layer, in whichever naming the checkpoint uses."""
    if p + "block_sparse_moe.gate.weight" in w:  # Mixtral as published
        q = p + "block_sparse_moe."
        experts = [_swiglu(w, f"{q}experts.{e}.", "w1", "w3", "w2") for e in range(moe.num_experts)]
        return w[q + "gate.weight"], experts
    q = p + "mlp."
    stacked = w.get(q + "experts.gate_up_proj")
    if stacked is not None:  # transformers 5's fused form: [E, 2 * intermediate, hidden], [E, hidden, intermediate]
        down = w[q + "experts.down_proj"]
        return w[q + "gate.weight"], [SwiGLU(stacked[e], down[e]) for e in range(moe.num_experts)]
    return w[q + "gate.weight"], [_swiglu(w, f"{q}experts.{e}.") for e in range(moe.num_experts)]


def _mlp(config: ModelConfig, w: Weights, p: str, i: int):
    moe = config.moe
    if moe is None or i not in moe.sparse_layers:
        return _swiglu(w, p + "mlp.")
    router, experts = _experts(w, p, moe)
    if moe.shared_intermediate_size:
        shared = _swiglu(w, p + "mlp.shared_expert.")
        return SparseMoE(moe, router, experts, shared, w[p + "mlp.shared_expert_gate.weight"])
    return SparseMoE(moe, router, experts)


def build_layer(config: ModelConfig, w: Weights, i: int) -> Layer:
    """Layer `i` of the checkpoint's weights (names without the `model.` prefix)."""
    p = f"layers.{i}."
    try:
        qkv, qkv_bias = _qkv(w, p)
        rows = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        if qkv.shape[0] != rows:
            raise UnsupportedModelError(f"layer {i}'s q/k/v projections have {qkv.shape[0]} rows; the config's "
                                        f"heads and head_dim need {rows}")
        q_norm = k_norm = None
        if config.qk_norm:
            q_norm, k_norm = w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"]
        return Layer(input_norm=w[p + "input_layernorm.weight"], qkv=qkv, qkv_bias=qkv_bias,
                     o=w[p + "self_attn.o_proj.weight"], post_norm=w[p + "post_attention_layernorm.weight"],
                     mlp=_mlp(config, w, p, i), q_norm=q_norm, k_norm=k_norm)
    except KeyError as e:
        raise UnsupportedModelError(f"checkpoint is missing weight {e.args[0]!r}") from None
