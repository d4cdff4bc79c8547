"""HF transformers' greedy tokens: the reference every mesh output is compared with."""

from __future__ import annotations

import torch


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Exactly max_tokens greedy tokens after prompt_ids from an HF model (EOS does not stop it)."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
