"""Attention over the paged KV cache in tiles, so a batch's contexts are never copied out whole at once.

The gather path (`ATTENTION_GATHER`) copies every sequence's blocks of a decode group into one contiguous tensor
per step and layer, then attends: at batch 32 and 2,048 tokens of context that is 100 MB of K and V per layer,
fresh pages (past malloc's mmap threshold) faulted in on every call, and the copy costs more than the attention.
Pure torch has no matmul that follows a block table, so the paged path (`ATTENTION_PAGED`) bounds what is copied
at once: a decode group is cut into sub-batches of rows whose gathered K fits TILE_BYTES (rows attend
independently, so each sub-batch is the gather path's exact computation on a few MB that stay in cache); a row
whose own context is past GATHER_LIMIT_BYTES reads its blocks a tile of block columns at a time
(`tiled_attention`: one [.., ctx] float32 score tensor, one softmax, exact). Measured in bench/paged_attention.py
against the gather path and a torch.compile'd kernel that indexes the pool in place (faster still at batch 32,
but it needs a C++ compiler in every worker image and ~30 s of compiling; see bench/RESULTS.md).
"""

from __future__ import annotations

import os

import torch

ATTENTION_GATHER, ATTENTION_PAGED = "gather", "paged"
ATTENTION_MODES = (ATTENTION_GATHER, ATTENTION_PAGED)
# Bytes of K (and again of V) one sub-batch or column tile gathers, and the most one row may gather whole; both
# chosen by bench/paged_attention.py (see bench/RESULTS.md).
TILE_BYTES = 2 << 20
GATHER_LIMIT_BYTES = 32 << 20
# A chunk of more queries than this amortises its one gather over them and keeps SDPA's flash kernel, which never
# holds the [queries, ctx] scores the tiled path does (measured: tiled wins at 4 queries, loses at 64).
MAX_TILED_QUERIES = 16


def attention_mode(mode: str | None = None) -> str:
    """The attention path: `mode` if given, else $KVMESH_ATTENTION, else paged; a clear error for others."""
    mode = mode or os.environ.get("KVMESH_ATTENTION") or ATTENTION_PAGED
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {', '.join(ATTENTION_MODES)} "
                         "(set KVMESH_ATTENTION or the attention argument)")
    return mode


def _block_bytes(k_pool: torch.Tensor) -> int:
    return k_pool[0].numel() * k_pool.element_size()


def use_tiles(mode: str, k_pool: torch.Tensor, num_blocks: int, queries: int = 1) -> bool:
    """Whether a row of `num_blocks` blocks and `queries` queries reads its context in column tiles: paged mode,
    few queries, and more K than one row should gather whole (GATHER_LIMIT_BYTES)."""
    return (mode == ATTENTION_PAGED and queries <= MAX_TILED_QUERIES
            and num_blocks * _block_bytes(k_pool) > GATHER_LIMIT_BYTES)


def row_slices(mode: str, k_pool: torch.Tensor, rows: int, num_blocks: int) -> list[slice]:
    """The sub-batches a decode group of `rows` contexts of `num_blocks` blocks gathers one at a time: in paged
    mode as many rows as fit TILE_BYTES of K (at least one), else the whole group."""
    per = rows if mode != ATTENTION_PAGED else max(1, TILE_BYTES // (num_blocks * _block_bytes(k_pool)))
    return [slice(i, min(i + per, rows)) for i in range(0, rows, per)]


def tile_blocks(k_pool: torch.Tensor, rows: int, tile_bytes: int | None = None) -> int:
    """How many block columns of `rows` sequences one tile reads (at least one)."""
    return max(1, (tile_bytes or TILE_BYTES) // (rows * _block_bytes(k_pool)))


def tiled_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, blocks: torch.Tensor,
                    mask: torch.Tensor | None, scale: float, softcap: float | None = None,
                    tile: int | None = None) -> torch.Tensor:
    """q [b, lq, heads, dim] over the pool blocks of each row's table (blocks [b, num_blocks]; the context is
    their num_blocks * block_size positions) where mask [b, lq, ctx] allows (None: all): [b, lq, heads * dim].

    Grouped-query heads share their kv head's tile (query heads of one kv head are stacked as rows, never
    repeating K/V); soft-capping (tanh(s / cap) * cap) sits between scores and softmax, as Gemma 2 has it."""
    b, lq, heads, dim = q.shape
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    num_blocks, group = blocks.shape[1], heads // kv_heads
    tile = tile or tile_blocks(k_pool, b)
    ctx = num_blocks * block_size
    if mask is not None and mask.shape[-1] < ctx:  # a prefill chunk's mask ends at its last token, not block
        mask = torch.cat((mask, mask.new_zeros(*mask.shape[:-1], ctx - mask.shape[-1])), dim=-1)
    qh = q.view(b, lq, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, group * lq, dim)
    scores = torch.empty(b, kv_heads, group * lq, ctx, dtype=torch.float32, device=q.device)
    for j in range(0, num_blocks, tile):
        cols = blocks[:, j:j + tile].reshape(-1)
        k = k_pool.index_select(0, cols).view(b, -1, kv_heads, dim)
        scores[..., j * block_size:j * block_size + k.shape[1]] = torch.matmul(qh, k.permute(0, 2, 3, 1))
    scores *= scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.view(b, kv_heads, group, lq, -1).masked_fill_(~mask[:, None, None], float("-inf"))
    probs = scores.softmax(-1).to(v_pool.dtype).view(b, kv_heads, group * lq, -1)
    out = None
    for j in range(0, num_blocks, tile):
        cols = blocks[:, j:j + tile].reshape(-1)
        v = v_pool.index_select(0, cols).view(b, -1, kv_heads, dim).transpose(1, 2)
        part = torch.matmul(probs[..., j * block_size:j * block_size + v.shape[2]], v)
        out = part if out is None else out.add_(part)
    return out.view(b, kv_heads, group, lq, dim).permute(0, 3, 1, 2, 4).reshape(b, lq, heads * dim)
