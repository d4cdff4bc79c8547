"""A step's batch as one int64 tensor, so the driver rank can broadcast it to the follower ranks.

Only plain integers cross: token ids, positions, cache slots, block ids and lengths (never a pickle). The
masks are not sent; each rank rebuilds them from the lengths with batch.py's own functions, so every rank runs
exactly the batch the driver built.

Layout: [n_tokens, n_logits, n_groups, n_prefills], input_ids, positions, slots, logits_index, then per decode
group [offset, count, ctx_len, n_blocks, has_mask] + blocks + (count lengths if has_mask), then per prefill span
[offset, length, start, n_blocks] + blocks (n_blocks 0: a span from position 0, plain causal).
"""

from __future__ import annotations

import torch

from kvmesh.services.engine.batch import DecodeGroup, PrefillSpan, StepBatch, decode_mask, prefill_mask


def encode_batch(batch: StepBatch) -> torch.Tensor:
    """The batch's forward-pass fields as a 1-D int64 CPU tensor."""
    parts = [torch.tensor([batch.input_ids.numel(), batch.logits_index.numel(), len(batch.decode_groups),
                           len(batch.prefills)]),
             batch.input_ids, batch.positions, batch.slots, batch.logits_index]
    for g in batch.decode_groups:
        lens = None if g.mask is None else g.mask.reshape(g.count, g.ctx_len).sum(1)
        parts += [torch.tensor([g.offset, g.count, g.ctx_len, g.blocks.numel(), int(lens is not None)]), g.blocks]
        if lens is not None:
            parts.append(lens)
    for s in batch.prefills:
        blocks = s.blocks if s.blocks is not None else torch.zeros(0, dtype=torch.long)
        parts += [torch.tensor([s.offset, s.length, s.start, blocks.numel()]), blocks]
    return torch.cat([p.reshape(-1).to(device="cpu", dtype=torch.long) for p in parts])


class _Reader:
    def __init__(self, data: torch.Tensor, device: str):
        self.data, self.device, self.at = data, device, 0

    def take(self, n: int) -> torch.Tensor:
        out = self.data[self.at:self.at + n]
        if out.numel() != n:
            raise ValueError("step message is shorter than its header says")
        self.at += n
        return out.to(self.device)

    def ints(self, n: int) -> list[int]:
        return self.take(n).tolist()


def decode_batch(data: torch.Tensor, device: str = "cpu") -> StepBatch:
    """The StepBatch that `encode_batch` wrote (fields the forward pass does not read are left empty)."""
    r = _Reader(data.cpu(), device)
    n_tokens, n_logits, n_groups, n_prefills = r.ints(4)
    input_ids, positions, slots, logits_index = r.take(n_tokens), r.take(n_tokens), r.take(n_tokens), r.take(n_logits)
    groups = []
    for _ in range(n_groups):
        offset, count, ctx, n_blocks, has_mask = r.ints(5)
        blocks = r.take(n_blocks)
        mask = decode_mask(r.take(count), ctx) if has_mask else None
        groups.append(DecodeGroup(offset, count, blocks, ctx, mask))
    spans = []
    for _ in range(n_prefills):
        offset, length, start, n_blocks = r.ints(4)
        blocks = r.take(n_blocks) if n_blocks else None
        mask = prefill_mask(start, length, device) if start > 0 else None
        spans.append(PrefillSpan(offset, length, start, blocks, mask))
    num_decode = sum(g.count for g in groups)
    return StepBatch(input_ids, positions, slots, num_decode, None, None, 0, spans, logits_index, [], groups)
