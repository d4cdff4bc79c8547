"""The Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM) over the paged KV cache.

RMSNorm, RoPE (default, linear, llama3), grouped-query attention, SwiGLU. Weights stay in the model dtype;
q/k/v and gate/up projections are fused into one matmul each. Decode tokens of every sequence share one
scaled_dot_product_attention call (padded context + mask); prefill chunks run one call each, plain causal
when they start at position 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kvmesh.services.engine.batch import DecodeGroup, StepBatch
from kvmesh.services.engine.errors import UnsupportedModelError
from kvmesh.services.engine.kv_cache import DTYPES, KVCache
from kvmesh.services.engine.weights import ModelConfig, inv_freq, load_config, load_weights

PACKED_DTYPES = (torch.float32, torch.bfloat16)
PACK_BATCH_HINT = 32  # the decode batch oneDNN tunes the packed layout for (any batch works)


class Linear:
    """y = x W^T (+ b) for 2-D x; on CPU through a oneDNN weight prepacked once at load.

    The prepacked (blocked) copy makes small-batch decode GEMMs 1.2-2x faster than F.linear on the plain weight,
    in float32 and bfloat16 alike; the plain weight is kept as `weight`. Other dtypes/devices use F.linear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self._packed = None
        if weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available():
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
                self(torch.zeros(1, weight.shape[1], dtype=weight.dtype))
            except (RuntimeError, AttributeError):  # no oneDNN kernel for this build/CPU: stay on F.linear
                self._packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None or x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


@dataclass
class Layer:
    """One decoder layer's weights (fused projections)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self):
        self.qkv_proj = Linear(self.qkv, self.qkv_bias)
        self.o_proj, self.gate_up_proj, self.down_proj = Linear(self.o), Linear(self.gate_up), Linear(self.down)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as the reference implementation does."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [tokens, heads, head_dim] by the per-token cos/sin ([tokens, 1, head_dim])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaModel:
    """Weights and forward of one Llama-family checkpoint."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
                 max_positions: int):
        self.config, self.dtype, self.device = config, dtype, device
        self.embed = weights["embed_tokens.weight"]
        self.norm = weights["norm.weight"]
        self.lm_head = weights["lm_head.weight"]
        self.layers = [self._layer(weights, i) for i in range(config.num_layers)]
        self.lm_head_proj = Linear(self.lm_head)
        # build_batch's group_cost for this model's decode attention path (see batch.GROUP_COST_TOKENS)
        self.decode_group_cost = 320 if dtype == torch.float32 else 1000
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq(config))
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = emb.cos().to(device), emb.sin().to(device)

    @classmethod
    def from_path(cls, path: str | Path, dtype: str = "auto", device: str = "cpu",
                  max_positions: int | None = None) -> "LlamaModel":
        """Load config and safetensors weights from a local HF folder; dtype "auto" = the checkpoint's own."""
        config = load_config(path)
        name = config.dtype if dtype == "auto" else dtype
        if name not in DTYPES:
            raise UnsupportedModelError(f"dtype {dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
        weights = load_weights(path, config, DTYPES[name], device)
        return cls(config, weights, DTYPES[name], device, max_positions or config.max_position_embeddings)

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> Layer:
        p = f"layers.{i}."
        try:
            qkv = torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            biases = [w.get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            return Layer(
                input_norm=w[p + "input_layernorm.weight"],
                qkv=qkv,
                qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
                o=w[p + "self_attn.o_proj.weight"],
                post_norm=w[p + "post_attention_layernorm.weight"],
                gate_up=torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]),
                down=w[p + "mlp.down_proj.weight"],
            )
        except KeyError as e:
            raise UnsupportedModelError(f"checkpoint is missing weight {e.args[0]!r}") from None

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: KVCache,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run one step: write the new K/V into the cache, return logits [len(batch.logits_index), vocab]."""
        cfg = self.config
        num_tokens = batch.input_ids.shape[0]
        h = self.embed[batch.input_ids]
        cos = self._cos[batch.positions].to(self.dtype)[:, None, :]
        sin = self._sin[batch.positions].to(self.dtype)[:, None, :]
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            q, k, v = layer.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
            q = apply_rope(q.view(num_tokens, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rope(k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            k_pool, v_pool = kv.layer(i)
            k_pool.view(-1, cfg.num_kv_heads, cfg.head_dim).index_copy_(0, batch.slots, k)
            v_pool.view(-1, cfg.num_kv_heads, cfg.head_dim).index_copy_(0, batch.slots, v)
            if layer_hook is not None:
                layer_hook(i)
            attn = self._attention(batch, q, k, v, k_pool, v_pool)
            h = h + layer.o_proj(attn)
            x = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up_proj(x).chunk(2, dim=-1)
            h = h + layer.down_proj(F.silu(gate) * up)
        h = rms_norm(h[batch.logits_index], self.norm, cfg.rms_norm_eps)
        return self.lm_head_proj(h)

    def _attention(self, batch: StepBatch, q, k, v, k_pool, v_pool) -> torch.Tensor:
        """Attention of every token over its sequence's cached context: [tokens, heads * head_dim]."""
        cfg = self.config
        outs = []
        for g in batch.decode_groups:
            outs.append(self._decode_attention(g, q[g.offset:g.offset + g.count], k_pool, v_pool))
        for span in batch.prefills:
            sl = slice(span.offset, span.offset + span.length)
            qp = q[sl].transpose(0, 1).unsqueeze(0)
            if span.blocks is None:
                kp, vp = k[sl].transpose(0, 1).unsqueeze(0), v[sl].transpose(0, 1).unsqueeze(0)
                out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
            else:
                ctx = span.start + span.length
                kp = k_pool.index_select(0, span.blocks).view(-1, cfg.num_kv_heads, cfg.head_dim)[:ctx]
                vp = v_pool.index_select(0, span.blocks).view(-1, cfg.num_kv_heads, cfg.head_dim)[:ctx]
                kp, vp = kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0)
                out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, enable_gqa=True)
            outs.append(out[0].transpose(0, 1).reshape(span.length, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _decode_attention(self, group: DecodeGroup, q: torch.Tensor, k_pool: torch.Tensor,
                          v_pool: torch.Tensor) -> torch.Tensor:
        """One query token per sequence (q [n, heads, head_dim]) over its gathered blocks: [n, heads*head_dim]."""
        cfg, n, ctx = self.config, q.shape[0], group.ctx_len
        kv_heads, dim = cfg.num_kv_heads, cfg.head_dim
        k = k_pool.index_select(0, group.blocks).view(n, ctx, kv_heads, dim)
        v = v_pool.index_select(0, group.blocks).view(n, ctx, kv_heads, dim)
        if q.dtype == torch.float32:  # measured: SDPA beats the bmm path below in float32 (~175 vs ~225 ms/step)
            out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=group.mask, enable_gqa=True)
            return out.reshape(n, -1)
        # CPU SDPA kernels are several times slower in bfloat16/float16 than plain batched matmuls for decode's
        # single-query shapes, and a matmul over the [ctx, kv_heads, dim] cache layout transposed would copy it.
        # So score every query head against every kv head of each position in one contiguous bmm (q laid out
        # block-diagonally: [kv_heads*dim, heads]), and keep only each head's own group; 3x the few attention
        # flops, no copies of the context.
        group_size = cfg.num_heads // kv_heads
        qb = q.new_zeros(n, kv_heads, dim, kv_heads, group_size)
        qb.diagonal(0, 1, 3).copy_(q.view(n, kv_heads, group_size, dim).permute(0, 3, 2, 1))
        scores = torch.bmm(k.view(n, ctx, kv_heads * dim),
                           qb.view(n, kv_heads * dim, cfg.num_heads)).float() * dim ** -0.5  # [n, ctx, heads]
        if group.mask is not None:
            scores = scores.masked_fill(~group.mask.view(n, ctx, 1), float("-inf"))
        probs = scores.softmax(1).to(q.dtype)
        out = torch.bmm(probs.transpose(1, 2), v.view(n, ctx, kv_heads * dim))  # [n, heads, kv_heads*dim]
        out = out.view(n, kv_heads, group_size, kv_heads, dim).diagonal(0, 1, 3)  # [n, group, dim, kv_heads]
        return out.permute(0, 3, 1, 2).reshape(n, -1)
