"""Whether the engine can serve a request as asked: the checks every way into the engine runs first."""

from __future__ import annotations

import numpy as np

from kvmesh.services.engine.errors import InvalidRequestError
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.kv_identity import KVLayout


def validate_request(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int,
                     layout: KVLayout, num_blocks: int) -> None:
    """Raise InvalidRequestError when the request cannot be served as asked by an engine of this context length,
    vocabulary and KV pool."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError("params must be a SamplingParams")
    params.validate(max_model_len, vocab_size)
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidRequestError("the prompt is empty; give at least one token")
    if n >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {n} tokens but the model's context is {max_model_len}; shorten the prompt "
            f"to at most {max_model_len - 1} tokens")
    bad = [t for t in prompt_token_ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token ids {bad[:5]} lie outside the vocabulary [0, {vocab_size})")
    total = n + params.max_tokens
    if total > max_model_len:
        raise InvalidRequestError(
            f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's context of "
            f"{max_model_len} tokens; lower max_tokens to at most {max_model_len - n}")
    if layout.num_blocks_for(total) > num_blocks:
        raise InvalidRequestError(
            f"prompt plus max_tokens ({total} tokens) exceeds the KV cache of "
            f"{num_blocks * layout.block_size} tokens; lower max_tokens or the prompt")
