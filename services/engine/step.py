"""One forward step over the scheduled batch: the model over every chunk, then one token sampled per sequence
whose chunk reaches its end."""

from __future__ import annotations

from typing import Callable

import torch

from kvmesh.services.engine.batch import Chunk, build_batch
from kvmesh.services.engine.kv_cache import KVCache
from kvmesh.services.engine.sampler import sample
from kvmesh.services.engine.sequence import Sequence
from kvmesh.services.engine.structured import mask_logits


def forward_step(model, kv_cache: KVCache, scheduled: list[tuple[Sequence, int]],
                 layer_hook: Callable[[int, list[str]], None] | None) -> list[tuple[Sequence, int, dict | None]]:
    """Run the model over the next `n` tokens of each scheduled sequence (writing their KV into the pool) and
    sample; (sequence, token, logprob info) of each sequence that wants a token. `layer_hook(layer, ids)` fires
    after each layer for the prompts this step completes (their every layer is final once it fires)."""
    chunks = [Chunk(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n],
                    seq.num_computed_tokens, seq.block_table, seq.num_computed_tokens + n == seq.num_tokens)
              for seq, n in scheduled]
    batch = build_batch(chunks, kv_cache.layout.block_size, model.device, group_cost=model.decode_group_cost)
    hook = None
    if layer_hook is not None:
        ids = [seq.request_id for seq, n in scheduled
               if seq.num_computed_tokens < seq.num_prompt_tokens <= seq.num_computed_tokens + n]
        hook = (lambda i: layer_hook(i, ids)) if ids else None
    logits = model.forward(batch, kv_cache, hook)
    sampled = [(seq, batch.chunk_rows[j]) for j, (seq, _) in enumerate(scheduled) if chunks[j].want_logits]
    if not sampled:
        return []
    rows = torch.tensor([row for _, row in sampled], device=logits.device)
    logits = mask_logits(logits.index_select(0, rows).float(), [s.matcher for s, _ in sampled])
    tokens, infos = sample(logits, [s.params for s, _ in sampled],
                           [s.generator for s, _ in sampled], [(s.token_ids, s.num_prompt_tokens) for s, _ in sampled])
    return [(seq, token, info) for (seq, _), token, info in zip(sampled, tokens, infos)]
