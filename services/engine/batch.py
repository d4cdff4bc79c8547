"""One forward step's input: the tokens of every scheduled chunk plus the paged-cache indices, built once per step.

A step mixes single decode tokens and prefill chunks of sequences of different lengths. Tokens are laid out
flat, decode tokens first (shortest context first, cut into groups of similar length so padded attention
wastes little), then each prefill chunk. Every index the layers need (cache slots to write, blocks
to gather for attention, padding masks) is computed here once, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence to run this step: `token_ids` sit at positions start .. start+len-1."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    want_logits: bool = True
    all_logits: bool = False  # logits at every position (a speculative draft's verify span), not the last only


@dataclass
class PrefillSpan:
    """A prefill chunk's place in the flat batch and the cache context it attends to."""

    offset: int
    length: int
    start: int
    blocks: torch.Tensor | None  # blocks covering positions 0 .. start+length-1 (None when start == 0)
    mask: torch.Tensor | None  # [length, start+length] bool, None when start == 0 (plain causal)


@dataclass
class DecodeGroup:
    """Decode tokens of similar context length, attended in one padded op: rows offset .. offset+count-1."""

    offset: int
    count: int
    blocks: torch.Tensor  # [count * max_blocks] block ids (padded with valid ids)
    ctx_len: int  # the longest context in the group, rounded up to whole blocks
    mask: torch.Tensor | None  # [count, 1, 1, ctx_len] bool, None when every context fills ctx_len


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
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # the decode tokens, shortest first


# Fixed cost of one more decode group, in context tokens of padded attention work (per-op overhead of a
# group's gather/matmul/softmax against the cost of a padded context token), tuned at batch 32 on SmolLM2-135M:
# float32 (SDPA) runs best near 320, the bf16 bmm path (more ops per group) near 1000 (the model says which).
GROUP_COST_TOKENS = 320


def group_by_length(lens: list[int], cost: int = GROUP_COST_TOKENS) -> list[int]:
    """Split ascending `lens` into runs minimising padded work + cost per run; the end index of each run."""
    n = len(lens)
    best, cut = [0] + [None] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):  # run lens[start:end], padded to lens[end-1]
            c = best[start] + (end - start) * lens[end - 1] + cost
            if best[end] is None or c < best[end]:
                best[end], cut[end] = c, start
    ends, end = [], n
    while end:
        ends.append(end)
        end = cut[end]
    return ends[::-1]


def prefill_mask(start: int, length: int, device: str = "cpu") -> torch.Tensor:
    """[length, start+length] bool: query start+i sees positions 0 .. start+i (a chunk after cached context)."""
    q_pos = torch.arange(start, start + length, device=device)
    return torch.arange(start + length, device=device)[None, :] <= q_pos[:, None]


def decode_mask(lens: torch.Tensor, ctx: int) -> torch.Tensor:
    """[len(lens), 1, 1, ctx] bool: row i sees its first lens[i] positions of a padded context."""
    return (torch.arange(ctx, device=lens.device)[None, :] < lens[:, None])[:, None, None, :]


def build_batch(chunks: list[Chunk], block_size: int, device: str = "cpu", all_logits: bool = False,
                group_cost: int = GROUP_COST_TOKENS) -> StepBatch:
    """Lay the chunks out flat (decode first) and precompute every cache index the layers need."""
    decode = sorted((i for i, c in enumerate(chunks) if len(c.token_ids) == 1), key=lambda i: chunks[i].start)
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
    groups = []
    if decode:
        lens = [chunks[i].start + 1 for i in decode]
        decode_len = lens[-1]
        start = 0
        for end in group_by_length(lens, group_cost):
            groups.append(_decode_group(chunks, decode[start:end], lens[start:end], start, block_size, device))
            start = end
        if len(groups) == 1:
            decode_blocks, decode_mask = groups[0].blocks, groups[0].mask
        else:
            whole = _decode_group(chunks, decode, lens, 0, block_size, device)
            decode_blocks, decode_mask = whole.blocks, whole.mask
    spans = []
    for i in prefill:
        c = chunks[i]
        n, start = len(c.token_ids), c.start
        blocks = mask = None
        if start > 0:
            blocks = as_long(c.block_table[:-(-(start + n) // block_size)])
            mask = prefill_mask(start, n, device)
        spans.append(PrefillSpan(flat_start[i], n, start, blocks, mask))
    rows, logits_index = [], []
    for i, c in enumerate(chunks):
        if all_logits or c.all_logits:
            rows.append(len(logits_index))
            logits_index.extend(range(flat_start[i], flat_start[i] + len(c.token_ids)))
        elif c.want_logits:
            rows.append(len(logits_index))
            logits_index.append(flat_start[i] + len(c.token_ids) - 1)
        else:
            rows.append(-1)
    return StepBatch(as_long(ids), as_long(pos), as_long(slots), len(decode), decode_blocks, decode_mask,
                     decode_len, spans, as_long(logits_index), rows, groups)


def _decode_group(chunks: list[Chunk], members: list[int], lens: list[int], offset: int, block_size: int,
                  device: str) -> DecodeGroup:
    max_blocks = -(-max(lens) // block_size)
    ctx = max_blocks * block_size  # whole blocks: the gathered context stays contiguous, the tail is masked
    table = []
    for i in members:
        bt = chunks[i].block_table[:max_blocks]
        table.extend(bt + [bt[0]] * (max_blocks - len(bt)))
    mask = decode_mask(torch.tensor(lens, device=device), ctx) if min(lens) != ctx else None
    return DecodeGroup(offset, len(members), torch.tensor(table, dtype=torch.long, device=device), ctx, mask)
