"""The Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM, Qwen3, Phi-3, Mixtral, Qwen2-MoE) over the
paged KV cache.

RMSNorm, RoPE (default, linear, llama3; partial rotary), grouped-query attention, SwiGLU or a mixture of SwiGLU
experts (moe.py). Per-family weight names and hooks (Qwen3's q/k norms) are read in layers.py. Weights stay in
the model dtype; q/k/v and gate/up projections are fused into one matmul each. Decode tokens of every sequence share one
scaled_dot_product_attention call (padded context + mask); prefill chunks run one call each, plain causal
when they start at position 0. In paged mode (the default) a decode group gathers a few MB of rows at a time, and a
very long context is read in column tiles (paged_attention.py); $KVMESH_ATTENTION=gather gathers whole groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kvmesh.services.engine.batch import DecodeGroup, StepBatch
from kvmesh.services.engine.errors import UnsupportedModelError
from kvmesh.services.engine.kv_cache import DTYPES, KVCache
from kvmesh.services.engine.layers import build_layer
from kvmesh.services.engine.linear import Linear
from kvmesh.services.engine.paged_attention import attention_mode, row_slices, tiled_attention, use_tiles
from kvmesh.services.engine.weights import ModelConfig, inv_freq, load_config, load_weights

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as the reference implementation does."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [tokens, heads, head_dim] by the per-token cos/sin ([tokens, 1, rotary_dim]); a rotary_dim short
    of head_dim (partial_rotary_factor < 1, as Phi-3's config may ask) rotates the leading dims only."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
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
        # tensor parallelism (tp.py): sums each rank's partial o_proj / down_proj output in place; None alone
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.attention = attention_mode()  # gather or paged (paged_attention.py); tests set it per model
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

    def close(self) -> None:
        """Release what the model holds beyond memory (a tensor-parallel model stops its ranks); a no-op here."""

    def _layer(self, weights: dict[str, torch.Tensor], i: int):
        """Layer i's weights (a family with layers of its own, such as Gemma, overrides this)."""
        return build_layer(self.config, weights, i)

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
            q, k = q.view(num_tokens, cfg.num_heads, cfg.head_dim), k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            if layer.q_norm is not None:  # Qwen3: RMSNorm over each head's q and k, before RoPE
                q, k = rms_norm(q, layer.q_norm, cfg.rms_norm_eps), rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            k_pool, v_pool = kv.layer(i)
            k_pool.view(-1, cfg.num_kv_heads, cfg.head_dim).index_copy_(0, batch.slots, k)
            v_pool.view(-1, cfg.num_kv_heads, cfg.head_dim).index_copy_(0, batch.slots, v)
            if layer_hook is not None:
                layer_hook(i)
            attn = self._attention(batch, q, k, v, k_pool, v_pool)
            h = h + self._reduce(layer.o_proj(attn))
            x = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
            h = h + self._reduce(layer.mlp(x))  # SwiGLU, or a mixture of SwiGLU experts (layers.py, moe.py)
        h = rms_norm(h[batch.logits_index], self.norm, cfg.rms_norm_eps)
        return self.lm_head_proj(h)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.all_reduce is None else self.all_reduce(x)

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
            elif use_tiles(self.attention, k_pool, span.blocks.shape[0], span.length):
                out = tiled_attention(q[sl][None], k_pool, v_pool, span.blocks[None], span.mask[None],
                                      cfg.head_dim ** -0.5)
                outs.append(out[0])
                continue
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
        """One query token per sequence (q [n, heads, head_dim]) over its paged context: [n, heads*head_dim]."""
        n, ctx = q.shape[0], group.ctx_len
        blocks, mask = group.blocks.view(n, -1), group.mask
        if use_tiles(self.attention, k_pool, blocks.shape[1]):
            mask = None if mask is None else mask.view(n, 1, ctx)
            return tiled_attention(q[:, None], k_pool, v_pool, blocks, mask, self.config.head_dim ** -0.5)[:, 0]
        parts = [self._gathered_decode(q[r], blocks[r].reshape(-1), None if mask is None else mask[r], ctx,
                                       k_pool, v_pool) for r in row_slices(self.attention, k_pool, n, blocks.shape[1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gathered_decode(self, q: torch.Tensor, blocks: torch.Tensor, mask: torch.Tensor | None, ctx: int,
                         k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """Decode attention of q [n, heads, head_dim] over its rows' blocks gathered whole: [n, heads*head_dim]."""
        cfg, n = self.config, q.shape[0]
        kv_heads, dim = cfg.num_kv_heads, cfg.head_dim
        k = k_pool.index_select(0, blocks).view(n, ctx, kv_heads, dim)
        v = v_pool.index_select(0, blocks).view(n, ctx, kv_heads, dim)
        if q.dtype == torch.float32:  # measured: SDPA beats the bmm path below in float32 (~175 vs ~225 ms/step)
            out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, enable_gqa=True)
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
        if mask is not None:
            scores = scores.masked_fill(~mask.view(n, ctx, 1), float("-inf"))
        probs = scores.softmax(1).to(q.dtype)
        out = torch.bmm(probs.transpose(1, 2), v.view(n, ctx, kv_heads * dim))  # [n, heads, kv_heads*dim]
        out = out.view(n, kv_heads, group_size, kv_heads, dim).diagonal(0, 1, 3)  # [n, group, dim, kv_heads]
        return out.permute(0, 3, 1, 2).reshape(n, -1)
