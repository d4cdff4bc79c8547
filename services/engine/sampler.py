"""Sampling: parameters with validation, and turning one step's logits into one token per sequence.

Greedy rows are decided in one argmax over the batch. Sampled rows each draw from their own torch.Generator,
so a seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvmesh.services.engine.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    max_tokens: int = 16  # output tokens at most
    seed: int | None = None  # per-request seed: reproducible regardless of batch-mates
    stop: tuple[str, ...] = ()  # stop strings, checked on the detokenised output; not part of the result
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the request (kept in the ids)
    ignore_eos: bool = False  # keep going past the model's end-of-sequence tokens
    logprobs: int | None = None  # return the chosen token's logprob and the top-N alternatives

    def validate(self, max_model_len: int, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the first bad field and what would be accepted."""
        if not (self.temperature >= 0):
            raise InvalidRequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 (disabled) or a positive count, got {self.top_k}")
        if not (0 <= self.min_p <= 1):
            raise InvalidRequestError(f"min_p must lie in [0, 1], got {self.min_p}")
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.max_tokens >= max_model_len:
            raise InvalidRequestError(
                f"max_tokens={self.max_tokens} cannot fit the model's context of {max_model_len} tokens")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(f"logprobs must lie in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a sequence of non-empty strings")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids {bad} lie outside the vocabulary [0, {vocab_size})")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError(f"seed must lie in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, min-p and top-p applied to one row of float32 logits."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep tokens until the mass reaches top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator]) -> tuple[list[int], list[dict | None]]:
    """One token per row of `logits`; plus, for rows that asked, {"logprob", "top": [(id, logprob), ...]}."""
    logits = logits.float()
    tokens = logits.argmax(-1).tolist()
    for row, p in enumerate(params):
        if not p.greedy:
            probs = _filter(logits[row], p).softmax(-1)
            tokens[row] = int(torch.multinomial(probs, 1, generator=generators[row]).item())
    infos: list[dict | None] = [None] * len(params)
    if any(p.logprobs is not None for p in params):
        logp = logits.log_softmax(-1)
        for row, p in enumerate(params):
            if p.logprobs is None:
                continue
            top = torch.topk(logp[row], p.logprobs) if p.logprobs else None
            infos[row] = {
                "token_id": tokens[row],
                "logprob": float(logp[row, tokens[row]]),
                "top": list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
            }
    return tokens, infos
