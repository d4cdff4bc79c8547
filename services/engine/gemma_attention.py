"""Gemma's attention over the paged KV cache: its own scale, optional logit soft-capping, and a sliding window on
local layers, on every path a step has (prefill from position 0, chunked prefill, batched decode).

Soft-capping (tanh(s / cap) * cap) sits between the scores and the softmax, where scaled_dot_product_attention
cannot reach, so soft-capped layers compute the scores explicitly; so does bfloat16, where CPU SDPA kernels are
slow (see `LlamaModel._decode_attention`). Uncapped float32 layers keep SDPA. The sliding window is a mask: a
query at position p sees keys at p - window + 1 .. p, as HF's `sliding_window_overlay` defines it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmesh.services.engine.batch import DecodeGroup, StepBatch
from kvmesh.services.engine.paged_attention import ATTENTION_GATHER, row_slices, tiled_attention, use_tiles


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends."""

    scale: float  # multiplies q.k (Gemma: query_pre_attn_scalar ** -0.5, not head_dim ** -0.5)
    softcap: float | None  # attention logit soft-capping (Gemma 2), None for none
    window: int | None  # local (sliding-window) layers: keys of the last `window` positions only


@dataclass
class StepMasks:
    """The keys each query of a step reads (blocks) and may see (True = attend), built once per step and layer
    kind. With a window, each row reads only the blocks the window reaches, not its whole context."""

    decode: list[tuple[torch.Tensor, torch.Tensor]]  # per decode group: blocks [count * n_blocks], mask [count, ctx]
    prefill: list[tuple[torch.Tensor | None, torch.Tensor]]  # per span: blocks from the window's first, mask


def _allowed(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[q, kv] (or [q, kv] from a per-row kv_pos [q, kv]): causal, within the window when given."""
    kv_pos = kv_pos if kv_pos.dim() == 2 else kv_pos[None, :]
    mask = kv_pos <= q_pos[:, None]
    if window is not None:
        mask &= kv_pos > q_pos[:, None] - window
    return mask


def _decode_reads(g: DecodeGroup, positions: torch.Tensor, window: int | None,
                  block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode group's blocks and mask; with a window, only the (at most) window_blocks blocks it reaches."""
    arange = torch.arange(g.ctx_len, device=positions.device)
    max_blocks = g.ctx_len // block_size
    window_blocks = None if window is None else (window - 2) // block_size + 2  # blocks window tokens can span
    if window_blocks is None or window_blocks >= max_blocks:
        return g.blocks, _allowed(positions, arange, window)
    first = (positions - window + 1).clamp(min=0) // block_size  # each row's first block in the window
    cols = first[:, None] + torch.arange(window_blocks, device=positions.device)[None, :]
    # columns past a row's last block repeat it; their positions lie beyond the row's own, so the mask drops them
    blocks = g.blocks.view(g.count, max_blocks).gather(1, cols.clamp(max=max_blocks - 1)).reshape(-1)
    kv_pos = first[:, None] * block_size + arange[None, :window_blocks * block_size]
    return blocks, _allowed(positions, kv_pos, window)


def step_masks(batch: StepBatch, window: int | None, block_size: int) -> StepMasks:
    """What every decode group and prefill span of `batch` reads and sees, under `window` when given.

    A decode row's own position bounds its keys, so the padding of a group's shorter contexts is masked too."""
    device = batch.positions.device
    decode = [_decode_reads(g, batch.positions[g.offset:g.offset + g.count], window, block_size)
              for g in batch.decode_groups]
    prefill = []
    for s in batch.prefills:
        first = 0 if s.blocks is None or window is None else max(0, s.start - window + 1) // block_size
        blocks = None if s.blocks is None else s.blocks[first:]
        prefill.append((blocks, _allowed(torch.arange(s.start, s.start + s.length, device=device),
                                         torch.arange(first * block_size, s.start + s.length, device=device),
                                         window)))
    return StepMasks(decode, prefill)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           spec: AttentionSpec) -> torch.Tensor:
    """q [b, lq, heads, dim] over k, v [b, lk, kv_heads, dim] where mask [b, lq, lk] allows: [b, lq, heads*dim]."""
    b, lq, heads, dim = q.shape
    if spec.softcap is None and q.dtype == torch.float32:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask[:, None], scale=spec.scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, lq, heads * dim)
    lk, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # query heads of one kv head stacked as rows: [b, kv_heads, group * lq, dim], so K/V are never repeated
    qh = q.view(b, lq, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, group * lq, dim)
    scores = torch.matmul(qh, k.permute(0, 2, 3, 1)).float() * spec.scale  # [b, kv_heads, group * lq, lk]
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    scores = scores.view(b, kv_heads, group, lq, lk).masked_fill(~mask[:, None, None], float("-inf"))
    probs = scores.softmax(-1).to(v.dtype).view(b, kv_heads, group * lq, lk)
    out = torch.matmul(probs, v.transpose(1, 2))  # [b, kv_heads, group * lq, dim]
    return out.view(b, kv_heads, group, lq, dim).permute(0, 3, 1, 2, 4).reshape(b, lq, heads * dim)


def paged_attention(batch: StepBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                    v_pool: torch.Tensor, masks: StepMasks, spec: AttentionSpec,
                    mode: str = ATTENTION_GATHER) -> torch.Tensor:
    """Attention of every token of `batch` over its sequence's cached context: [tokens, heads * head_dim].

    q, k, v are this step's [tokens, heads or kv_heads, dim]; the pools already hold this step's K/V. In paged
    `mode`, decode groups gather a sub-batch of rows at a time, and a very long context is read in column tiles
    (paged_attention.py)."""
    kv_heads, dim = k.shape[1], k.shape[2]
    outs = []
    for g, (blocks, mask) in zip(batch.decode_groups, masks.decode):
        n, ctx, qg, table = g.count, mask.shape[1], q[g.offset:g.offset + g.count], blocks.view(g.count, -1)
        if use_tiles(mode, k_pool, table.shape[1]):
            outs.append(tiled_attention(qg[:, None], k_pool, v_pool, table, mask[:, None], spec.scale,
                                        spec.softcap)[:, 0])
            continue
        for r in row_slices(mode, k_pool, n, table.shape[1]):
            rows = table[r].reshape(-1)
            kg = k_pool.index_select(0, rows).view(-1, ctx, kv_heads, dim)
            vg = v_pool.index_select(0, rows).view(-1, ctx, kv_heads, dim)
            outs.append(attend(qg[r].unsqueeze(1), kg, vg, mask[r].unsqueeze(1), spec)[:, 0])
    for span, (blocks, mask) in zip(batch.prefills, masks.prefill):
        sl = slice(span.offset, span.offset + span.length)
        if blocks is not None and use_tiles(mode, k_pool, blocks.numel(), span.length):
            outs.append(tiled_attention(q[sl][None], k_pool, v_pool, blocks[None], mask[None], spec.scale,
                                        spec.softcap)[0])
            continue
        if blocks is None:  # from position 0: the chunk's own K/V are the whole context
            kp, vp = k[sl], v[sl]
        else:  # the context from the first block the window reaches (block 0 without a window)
            ctx = mask.shape[1]
            kp = k_pool.index_select(0, blocks).view(-1, kv_heads, dim)[:ctx]
            vp = v_pool.index_select(0, blocks).view(-1, kv_heads, dim)[:ctx]
        outs.append(attend(q[sl][None], kp[None], vp[None], mask[None], spec)[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs)
