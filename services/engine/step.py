"""One forward step over the scheduled batch: the model over every chunk, then the tokens of every sequence whose
chunk reaches its end (one; or, for a sequence verifying draft tokens, one per verified position)."""

from __future__ import annotations

from typing import Callable

import torch

from kvmesh.services.engine.batch import Chunk, build_batch
from kvmesh.services.engine.kv_cache import KVCache
from kvmesh.services.engine.sampler import sample
from kvmesh.services.engine.sequence import Sequence, SequenceStatus
from kvmesh.services.engine.structured import mask_logits


def _chunk(seq: Sequence, n: int, draft: list[int] | None) -> Chunk:
    start = seq.num_computed_tokens
    if draft:  # its last token and the draft after it, with logits at every position
        return Chunk(seq.token_ids[start:start + n] + list(draft), start, seq.block_table, True, True)
    return Chunk(seq.token_ids[start:start + n], start, seq.block_table, start + n == seq.num_tokens)


def forward_step(model, kv_cache: KVCache, scheduled: list[tuple[Sequence, int]],
                 layer_hook: Callable[[int, list[str]], None] | None,
                 drafts: dict[str, list[int]] | None = None) -> list[tuple[Sequence, list[int], list]]:
    """Run the model over the next `n` tokens of each scheduled sequence (plus its draft tokens, `drafts` by
    request id; their KV is written too) and pick tokens: (sequence, tokens, logprob infos) of each sequence that
    wants one; a drafted sequence gets the model's token after each of its verified positions. `layer_hook(layer,
    ids)` fires after each layer for the prompts this step completes (their every layer is final once it fires)."""
    drafts = drafts or {}
    chunks = [_chunk(seq, n, drafts.get(seq.request_id)) for seq, n in scheduled]
    batch = build_batch(chunks, kv_cache.layout.block_size, model.device, group_cost=model.decode_group_cost)
    hook = None
    if layer_hook is not None:
        ids = [seq.request_id for seq, n in scheduled
               if seq.num_computed_tokens < seq.num_prompt_tokens <= seq.num_computed_tokens + n]
        hook = (lambda i: layer_hook(i, ids)) if ids else None
    logits = model.forward(batch, kv_cache, hook)
    rows, owners = [], []
    for j, (seq, _) in enumerate(scheduled):
        if chunks[j].want_logits:
            count = len(chunks[j].token_ids) if chunks[j].all_logits else 1
            rows.extend(range(batch.chunk_rows[j], batch.chunk_rows[j] + count))
            owners.append((seq, count))
    if not owners:
        return []
    seqs = [seq for seq, count in owners for _ in range(count)]
    picked = logits.index_select(0, torch.tensor(rows, device=logits.device)).float()
    tokens, infos = sample(mask_logits(picked, [s.matcher for s in seqs]), [s.params for s in seqs],
                           [s.generator for s in seqs], [(s.token_ids, s.num_prompt_tokens) for s in seqs])
    out, i = [], 0
    for seq, count in owners:
        out.append((seq, tokens[i:i + count], infos[i:i + count]))
        i += count
    return out


def append_tokens(stops, seq: Sequence, tokens: list[int], infos: list) -> None:
    """Append tokens until one ends the sequence (`stops`, an output.StopChecker): a stop inside an accepted draft
    run ends it right there."""
    for token, info in zip(tokens, infos):
        seq.token_ids.append(token)
        seq.logprobs.append(info)
        if seq.prefill_only:  # the decode side applies the stop and grammar rules to this token (add_prefilled)
            seq.status = SequenceStatus.PREFILLED
            return
        if seq.matcher is not None:
            seq.matcher.accept(token)
        stops.check(seq)
        if seq.status.finished:
            return
