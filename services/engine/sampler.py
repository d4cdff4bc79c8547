"""Sampling: parameters with validation, and turning one step's logits into one token per sequence.

Greedy rows are decided in one argmax over the batch. Sampled rows each draw from their own torch.Generator,
so a seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from kvmesh.services.engine.errors import InvalidRequestError
from kvmesh.services.engine.penalties import apply_penalties
from kvmesh.services.engine.structured import KINDS, Constraint

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
MAX_BIASED_TOKENS = 1024  # logit_bias entries per request at most


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
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # HF's: divides (multiplies, if negative) logits of prompt + generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs added to the logits
    structured: Constraint | None = None  # the output must match this grammar (structured.py)
    priority: int = 0  # scheduling, as vLLM's: the waiting queue serves lower values first (ties: arrival order)

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
        self._validate_penalties(vocab_size)
        if self.structured is not None and (self.structured.kind not in KINDS or self.structured.num_resumed < 0):
            raise InvalidRequestError(f"structured output kind must be one of {', '.join(KINDS)} with "
                                      f"num_resumed_tokens >= 0, got {self.structured}")

    def _validate_penalties(self, vocab_size: int) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must lie in [-2, 2], got {value}")
        if not (0 < self.repetition_penalty <= 100 and math.isfinite(self.repetition_penalty)):
            raise InvalidRequestError(f"repetition_penalty must lie in (0, 100] (1 = off), "
                                      f"got {self.repetition_penalty}")
        if len(self.logit_bias) > MAX_BIASED_TOKENS:
            raise InvalidRequestError(f"logit_bias names {len(self.logit_bias)} tokens; at most "
                                      f"{MAX_BIASED_TOKENS} are accepted")
        for token_id, bias in self.logit_bias:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(f"logit_bias token {token_id} lies outside the vocabulary [0, {vocab_size})")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(f"logit_bias for token {token_id} must lie in [-100, 100], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def constrained(self) -> bool:
        """Whether a grammar decides which tokens may come next: such a sequence's tokens depend on a matcher's
        state step by step, so it must not be speculated (drafted tokens would skip the mask)."""
        return self.structured is not None


def _column(params: Sequence[SamplingParams], field: str, device, default=None) -> torch.Tensor:
    values = [getattr(p, field) for p in params]
    if default is not None:
        values = [v if v > 0 else default for v in values]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Sample one token per row by inverse CDF, batched; each row's uniform comes from its own generator.

    Temperature, then top-k, min-p and top-p (in that order, each on the renormalised survivors). Rows that
    need none of the three skip the sort over the vocabulary.
    """
    vocab = logits.shape[-1]
    logits = logits / _column(params, "temperature", logits.device)[:, None]
    u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators]).to(logits.device)
    if all(p.top_k <= 0 and p.min_p == 0 and p.top_p == 1 for p in params):
        cdf = logits.softmax(-1).cumsum(-1)
        return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=vocab - 1)[:, 0]
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    keep = ranks < _column(params, "top_k", logits.device, default=vocab)[:, None]
    keep &= probs >= _column(params, "min_p", logits.device)[:, None] * probs[:, :1]
    probs = probs * keep
    probs = probs / probs.sum(-1, keepdim=True)
    keep &= (probs.cumsum(-1) - probs) < _column(params, "top_p", logits.device)[:, None]
    cdf = (probs * keep).cumsum(-1)
    pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=vocab - 1)
    return order.gather(1, pos)[:, 0]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
           histories: Sequence | None = None) -> tuple[list[int], list[dict | None]]:
    """One token per row of `logits`; plus, for rows that asked, {"logprob", "top": [(id, logprob), ...]}.

    `histories[i]` is row i's (token ids so far, number of prompt tokens), which the penalties need. Logprobs are
    those of the distribution after penalties and logit_bias, before temperature and truncation.
    """
    logits = apply_penalties(logits.float(), params, histories)
    chosen = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        drawn = _sample_rows(logits.index_select(0, index), [params[i] for i in rows], [generators[i] for i in rows])
        chosen = chosen.index_copy(0, index, drawn)
    tokens = chosen.tolist()
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
