"""N-gram (prompt-lookup) speculative decoding: draft tokens from a sequence's own context, verify them greedily.

For a greedy decoding sequence the last n tokens of its context (n from ngram_max down to ngram_min) are looked
up earlier in the context; the tokens that followed the latest earlier match (with K tokens after it, else the
earliest: a repeated run drafts its whole length, not the one token before the context ends) are the draft. The
step then runs the sequence's last token plus the K draft tokens as one span over the paged cache (the
chunked-prefill attention path, logits at every position), and keeps the longest draft prefix the model itself
would have picked plus the model's next token: in float32 the output is token for token what plain greedy
decoding gives. In bfloat16 the verify span (K+1 rows, another attention kernel) rounds differently from a
one-token step, as batching does, so at a near-tie of the top two logits the two may pick different tokens.
KV slots written for rejected drafts are left behind: the sequence's computed length rolls back and blocks past
it are freed.

Only plain greedy requests speculate (temperature 0, no penalties, no logit_bias, no structured output): for them
the token at each position depends on the logits alone. Others decode one token per step in the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvmesh.services.engine.errors import InvalidRequestError
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.engine.sequence import Sequence

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a decode engine drafts tokens for greedy sequences."""

    method: str = "ngram"  # the only one: prompt lookup over the sequence's own tokens
    num_speculative_tokens: int = 4  # draft tokens verified per step at most (K)
    ngram_min: int = 2  # shortest suffix looked up (vLLM's prompt_lookup_min)
    ngram_max: int = 5  # longest suffix looked up, tried first (vLLM's prompt_lookup_max)

    def validate(self) -> None:
        """Raise InvalidRequestError naming the bad field."""
        if self.method not in METHODS:
            raise InvalidRequestError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 64:
            raise InvalidRequestError(f"num_speculative_tokens must lie in [1, 64], got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InvalidRequestError(f"ngram_min and ngram_max must satisfy 1 <= ngram_min <= ngram_max, got "
                                      f"{self.ngram_min} and {self.ngram_max}")


def speculates(params: SamplingParams) -> bool:
    """Whether a request's tokens are a function of the logits alone (greedy, nothing added to the logits, no
    grammar masking them: a constrained sequence's matcher advances one accepted token at a time)."""
    return (params.greedy and not params.logit_bias and params.presence_penalty == 0
            and params.frequency_penalty == 0 and params.repetition_penalty == 1 and not params.constrained)


def propose_ngram(token_ids: list[int], ngram_min: int, ngram_max: int, k: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the context's last n tokens (longest n first; the
    latest occurrence with k tokens after it, else the earliest); [] when no suffix of ngram_min..ngram_max tokens
    occurs earlier."""
    if k <= 0 or len(token_ids) <= ngram_min:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(ngram_max, len(tokens) - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # every earlier start, suffix excluded
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:  # the latest match with k tokens after it, else the earliest (the most tokens after it)
            full = hits[hits + n + k <= len(tokens)]
            start = int(full[-1] if full.size else hits[0]) + n
            return tokens[start:start + k].tolist()
    return []


def accept_greedy(drafts: list[int], targets: list[int]) -> int:
    """How many of the model's tokens `targets` (one per verified position, len(drafts) + 1) to keep: the drafts
    it agrees with, in order, plus its own next token."""
    num = 0
    while num < len(drafts) and drafts[num] == targets[num]:
        num += 1
    return num + 1


class NgramSpeculator:
    """Picks the drafts of each step's greedy decode sequences and counts drafted and accepted tokens."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int,
                 on_verify: Callable[[int, int], None] | None = None):
        """on_verify(num_drafts, num_accepted) after each verified draft, on the engine thread (e.g. metrics)."""
        config.validate()
        self.config, self.max_model_len, self.on_verify = config, max_model_len, on_verify
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def draft(self, seq: Sequence, budget: int) -> list[int]:
        """Draft tokens for a sequence about to decode one token ([] when it should not speculate): never more
        than `budget`, nor past its max_tokens or the model's context."""
        p = seq.params
        if seq.prefill_only or seq.num_uncomputed_tokens != 1 or not speculates(p):
            return []
        room = min(self.config.num_speculative_tokens, budget, p.max_tokens - seq.num_output_tokens - 1,
                   self.max_model_len - seq.num_tokens - 1)
        return propose_ngram(seq.token_ids, self.config.ngram_min, self.config.ngram_max, room)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One verified draft: `num_drafts` proposed, `num_accepted` of them kept."""
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if self.on_verify is not None:
            self.on_verify(num_drafts, num_accepted)

    def stats(self) -> dict[str, int]:
        """Draft tokens proposed and accepted so far."""
        return {"draft_tokens": self.num_draft_tokens, "accepted_tokens": self.num_accepted_tokens}

    def plan(self, scheduled: list[tuple[Sequence, int]], scheduler) -> dict[str, list[int]]:
        """Drafts of this step's decode sequences by request id, their blocks grown to hold them; within the
        step's token budget, and only where blocks are free (no one is preempted for a draft)."""
        budget = scheduler.max_num_batched_tokens - sum(n for _, n in scheduled)
        drafts = {}
        for seq, n in scheduled:
            tokens = self.draft(seq, budget) if n == 1 and budget > 0 else []
            if tokens and scheduler.try_grow(seq, 1 + len(tokens)):
                drafts[seq.request_id] = tokens
                budget -= len(tokens)
        return drafts

    def accept(self, drafts: list[int], targets: list[int], infos: list) -> tuple[list[int], list]:
        """The tokens (and logprob entries) a verified draft yields: the agreed drafts plus the model's next."""
        num = accept_greedy(drafts, targets)
        self.record(len(drafts), num - 1)
        return targets[:num], infos[:num]

    @staticmethod
    def settle(seq: Sequence, scheduler, prefix_cache) -> None:
        """After a verified draft's tokens joined `seq`: its KV is valid up to its last token (rejected drafts'
        slots are dropped), full blocks become findable, blocks past its tokens go back."""
        seq.num_computed_tokens = seq.num_tokens - 1
        if prefix_cache is not None:
            prefix_cache.cache_blocks(seq)
        scheduler.trim(seq)
