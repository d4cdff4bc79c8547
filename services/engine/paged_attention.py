"""Attention over the paged KV cache in tiles of blocks, so a long context is never copied out whole.

The gather path (`ATTENTION_GATHER`) copies every sequence's blocks into one contiguous tensor per step and layer,
then attends: at batch 32 and 2,048 tokens of context that is ~100 MB written and read back per layer, far past
the CPU's caches (and past malloc's mmap threshold: fresh pages to fault in every call), and the copy costs
more than the attention (bench/paged_attention.py: 2.5x at batch 32, 2,048 tokens). Pure torch has no
matmul that follows a block table, so the tiled path (`ATTENTION_PAGED`) reads the pool a tile of block
columns at a time (a few MB: the copy stays in cache), scores each tile into one [.., ctx] float32 score
tensor, takes one softmax over it (exact, no online rescaling) and adds each tile's probabilities x V.
A batch whose contexts fit in GATHER_LIMIT_BYTES still goes the gather path's way (measured faster there).
No compiler is needed at run time (a `torch.compile`d kernel was faster still, but needs a C++ compiler in
every worker image and ~30 s of compiling per shape family; see bench/RESULTS.md).
"""

from __future__ import annotations

import os

import torch

ATTENTION_GATHER, ATTENTION_PAGED = "gather", "paged"
ATTENTION_MODES = (ATTENTION_GATHER, ATTENTION_PAGED)
# Bytes of K (and again of V) read per tile, and the most a step's group may gather whole; both chosen by
# bench/paged_attention.py (see bench/RESULTS.md).
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


def use_tiles(mode: str, k_pool: torch.Tensor, rows: int, num_blocks: int, queries: int = 1) -> bool:
    """Whether `rows` contexts of `num_blocks` blocks each, `queries` queries a row, go the tiled way: paged
    mode, few queries, and more to read than the gather path handles well (GATHER_LIMIT_BYTES of K)."""
    return (mode == ATTENTION_PAGED and queries <= MAX_TILED_QUERIES
            and rows * num_blocks * _block_bytes(k_pool) > GATHER_LIMIT_BYTES)


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
