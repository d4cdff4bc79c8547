"""Feed-forward blocks: the SwiGLU MLP and a sparse mixture of SwiGLU experts (Mixtral, Qwen2-MoE).

Routing follows HF transformers: softmax over the router's logits in float32, the top k experts per token, their
weights renormalised to sum to 1 (Mixtral always; Qwen2-MoE when `norm_topk_prob`). Experts run batched: the
(token, expert) assignments are sorted by expert, and each expert that got any tokens runs one matmul pair over
all of them; the loop is over experts, never over tokens. Qwen2-MoE adds a shared expert on every token, scaled
by a sigmoid gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmesh.services.engine.errors import UnsupportedModelError
from kvmesh.services.engine.linear import Linear

MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts part of a config."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each routed expert
    renormalize: bool  # divide the top-k weights by their sum
    shared_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    sparse_layers: tuple[int, ...] = ()  # layers whose MLP is the mixture; the others are dense
    round_weights: bool = False  # Qwen2-MoE rounds the routing weights to the model dtype (as HF does)


def moe_config(raw: dict, arch: str, num_layers: int) -> MoEConfig | None:
    """The MoEConfig of a raw config.json, None for a dense model."""
    if arch not in MOE_ARCHITECTURES:
        return None
    if arch == "MixtralForCausalLM":
        num_experts, renormalize, size, shared = raw["num_local_experts"], True, raw["intermediate_size"], 0
        sparse = tuple(range(num_layers))
    else:
        num_experts, renormalize = raw["num_experts"], bool(raw.get("norm_topk_prob", False))
        size, shared = raw["moe_intermediate_size"], raw.get("shared_expert_intermediate_size") or 0
        step, dense = raw.get("decoder_sparse_step", 1) or 1, set(raw.get("mlp_only_layers") or [])
        sparse = tuple(i for i in range(num_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0)
    top_k = raw["num_experts_per_tok"]
    if not 0 < top_k <= num_experts:
        raise UnsupportedModelError(f"num_experts_per_tok={top_k} must be between 1 and the {num_experts} experts")
    return MoEConfig(num_experts, top_k, size, renormalize, shared, sparse, arch == "Qwen2MoeForCausalLM")


class SwiGLU:
    """down(silu(gate(x)) * up(x)), gate and up fused into one matmul ([2 * intermediate, hidden])."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        self.gate_up, self.down = gate_up, down
        self.gate_up_proj, self.down_proj = Linear(gate_up), Linear(down)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE:
    """A router over `experts` (SwiGLU each), top-k per token, plus an optional gated shared expert."""

    def __init__(self, config: MoEConfig, router: torch.Tensor, experts: list[SwiGLU],
                 shared: SwiGLU | None = None, shared_gate: torch.Tensor | None = None):
        self.config, self.experts, self.shared = config, experts, shared
        self.router = Linear(router)
        self.shared_gate = Linear(shared_gate) if shared_gate is not None else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, k] in float32 or rounded to x's dtype, expert ids [tokens, k]), as HF routes."""
        probs = self.router(x).float().softmax(dim=-1)
        weights, ids = probs.topk(self.config.top_k, dim=-1)
        if self.config.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(x.dtype) if self.config.round_weights else weights), ids

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # assignments grouped by expert
        tokens = order // self.config.top_k
        scale = weights.flatten()[order, None]
        counts = torch.bincount(flat, minlength=self.config.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                rows = tokens[start:start + count]
                out.index_add_(0, rows, (expert(x[rows]) * scale[start:start + count]).to(x.dtype))
                start += count
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out
