"""One forward step's input: the tokens of every scheduled chunk plus the paged-cache indices, built once per step.

A step mixes single decode tokens and prefill chunks of sequences of different lengths. Tokens are laid out
flat, decode tokens first, then each prefill chunk. Every index the layers need (cache slots to write, blocks
to gather for attention, padding masks) is computed here once, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence to run this step: `token_ids` sit at positions start .. start+len-1."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    want_logits: bool = True


@dataclass
class PrefillSpan:
    """A prefill chunk's place in the flat batch and the cache context it attends to."""

    offset: int
    length: int
    start: int
    blocks: torch.Tensor | None  # blocks covering positions 0 .. start+length-1 (None when start == 0)
    mask: torch.Tensor | None  # [length, start+length] bool, None when start == 0 (plain causal)


@dataclass
class StepBatch:
    """Flat token tensors and paged-attention indices of one step."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    num_decode: int
    decode_blocks: torch.Tensor | None  # [num_decode * max_blocks] block ids (padded with valid ids)
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_len] bool, None when all lengths match
    decode_len: int  # context length the decode attention covers (the longest decode sequence)
    prefills: list[PrefillSpan]
    logits_index: torch.Tensor  # flat token indices whose logits the step returns
    chunk_rows: list[int]  # for each input chunk, its row in the logits (-1: no logits)


def build_batch(chunks: list[Chunk], block_size: int, device: str = "cpu", all_logits: bool = False) -> StepBatch:
    """Lay the chunks out flat (decode first) and precompute every cache index the layers need."""
    decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
    prefill = [i for i, c in enumerate(chunks) if len(c.token_ids) != 1]
    ids, pos, slots, flat_start = [], [], [], {}
    for i in decode + prefill:
        c = chunks[i]
        flat_start[i] = len(ids)
        ids.extend(c.token_ids)
        for p in range(c.start, c.start + len(c.token_ids)):
            pos.append(p)
            slots.append(c.block_table[p // block_size] * block_size + p % block_size)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    decode_blocks = decode_mask = None
    decode_len = 0
    if decode:
        lens = [chunks[i].start + 1 for i in decode]
        decode_len = max(lens)
        max_blocks = -(-decode_len // block_size)
        table = []
        for i in decode:
            bt = chunks[i].block_table[:max_blocks]
            table.extend(bt + [bt[0]] * (max_blocks - len(bt)))
        decode_blocks = as_long(table)
        if min(lens) != decode_len:
            decode_mask = (torch.arange(decode_len, device=device)[None, :] < as_long(lens)[:, None])
            decode_mask = decode_mask[:, None, None, :]
    spans = []
    for i in prefill:
        c = chunks[i]
        n, start = len(c.token_ids), c.start
        blocks = mask = None
        if start > 0:
            blocks = as_long(c.block_table[:-(-(start + n) // block_size)])
            q_pos = torch.arange(start, start + n, device=device)
            mask = torch.arange(start + n, device=device)[None, :] <= q_pos[:, None]
        spans.append(PrefillSpan(flat_start[i], n, start, blocks, mask))
    rows, logits_index = [], []
    for i, c in enumerate(chunks):
        if all_logits:
            rows.append(len(logits_index))
            logits_index.extend(range(flat_start[i], flat_start[i] + len(c.token_ids)))
        elif c.want_logits:
            rows.append(len(logits_index))
            logits_index.append(flat_start[i] + len(c.token_ids) - 1)
        else:
            rows.append(-1)
    return StepBatch(as_long(ids), as_long(pos), as_long(slots), len(decode), decode_blocks, decode_mask,
                     decode_len, spans, as_long(logits_index), rows)
