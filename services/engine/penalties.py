"""Logit processors that depend on what a sequence has seen: repetition, presence and frequency penalties, and a
per-request logit bias. Applied to the raw logits before temperature and truncation, so greedy rows obey them too.

Semantics follow the references clients expect:
- repetition_penalty: Hugging Face's `RepetitionPenaltyLogitsProcessor` over prompt + generated tokens (each
  token seen once or more: a positive logit divided by the penalty, a negative one multiplied by it);
- presence_penalty / frequency_penalty: OpenAI's, over generated tokens only
  (logit -= frequency_penalty * count + presence_penalty * (count > 0));
- logit_bias: added to the named tokens' logits (OpenAI's; Hugging Face's `SequenceBiasLogitsProcessor` for
  single-token sequences).
"""

from __future__ import annotations

from typing import Sequence

import torch


def wants_history(params) -> bool:
    """Whether a request's sampling depends on its tokens so far (or on a fixed bias)."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or bool(params.logit_bias))


def apply_penalties(logits: torch.Tensor, params: Sequence, histories: Sequence | None) -> torch.Tensor:
    """`logits` (rows x vocab, float) with each row's penalties and bias applied; the input is not modified.

    `histories[i]` is (token ids of row i so far, prompt + output; number of prompt tokens among them).
    """
    rows = [i for i, p in enumerate(params) if wants_history(p)]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        p = params[i]
        token_ids, num_prompt = histories[i] if histories is not None else ((), 0)
        row = logits[i]
        if p.repetition_penalty != 1.0 and len(token_ids):
            seen = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=row.device)
            score = row[seen]
            row[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        output = token_ids[num_prompt:]
        if (p.presence_penalty or p.frequency_penalty) and len(output):
            counts = torch.bincount(torch.tensor(list(output), dtype=torch.long, device=row.device),
                                    minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        for token_id, bias in p.logit_bias:
            row[token_id] += bias
    return logits
