"""The closed forms of a worker's step cost, shared by `kvmesh plan` (fitted once, offline) and the scheduler
(fitted online from heartbeats). Plain numbers, numpy for the fits, no torch: planning and routing need no engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefillModel:
    """Seconds of one engine step that computes prompt tokens: a + b·tokens + c·Σ(attention pairs).

    For one whole prompt of n tokens the attention term is n², so one prompt alone costs a + b·n + c·n²; a chunk
    of k tokens after p already computed attends over (p+k)² − p² pairs, so chunking a prompt costs what the
    whole costs, plus one intercept per extra step."""

    a: float
    b: float
    c: float

    def chunk_cost(self, done: int, num_tokens: int) -> float:
        """The variable part (no intercept) of computing num_tokens of a prompt whose first `done` are computed."""
        return self.b * num_tokens + self.c * ((done + num_tokens) ** 2 - done * done)

    def seconds(self, num_tokens: int) -> float:
        """One prompt of num_tokens, alone, in one step."""
        return self.a + self.chunk_cost(0, num_tokens)


@dataclass(frozen=True)
class DecodeModel:
    """Seconds of one decode step: a + b·batch + c·context_tokens (the sum of every running sequence's length)."""

    a: float
    b: float
    c: float

    def seconds(self, batch: int, context_tokens: int) -> float:
        """One step of `batch` sequences holding `context_tokens` tokens of KV in all."""
        return self.a + self.b * batch + self.c * context_tokens


@dataclass(frozen=True)
class StepShape:
    """What one engine step computed, in the terms of the two models: prompt tokens and their attention pairs,
    decoding sequences (one token each) and the context they attend over."""

    num_prefill_tokens: int = 0
    num_attention_pairs: int = 0
    num_decode_seqs: int = 0
    num_context_tokens: int = 0


def step_shape(chunks: Iterable[tuple[int, int]]) -> StepShape:
    """The shape of a step from its chunks, each (tokens already computed, tokens computed now). A one-token chunk
    after others is a decode step of its sequence (a one-token prompt tail costs the same)."""
    tokens = pairs = seqs = context = 0
    for done, n in chunks:
        if n == 1 and done > 0:
            seqs += 1
            context += done + 1
        else:
            tokens += n
            pairs += (done + n) ** 2 - done * done
    return StepShape(tokens, pairs, seqs, context)


def least_squares(rows: Sequence[Sequence[float]], seconds: Sequence[float]) -> tuple[float, ...]:
    """Non-negative least squares on relative errors: a negative coefficient would make a bigger batch faster,
    which no engine does, and samples spanning orders of magnitude would let the slowest decide every coefficient
    on absolute errors. Features that never vary from zero get 0."""
    y = np.asarray(seconds, dtype=float)
    x = np.asarray(rows, dtype=float) / y[:, None]
    y = np.ones_like(y)
    active = [i for i in range(x.shape[1]) if np.any(x[:, i])]
    coef = np.zeros(x.shape[1])
    while active:
        coef[:] = 0.0
        coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            break
        active = [i for i in active if i != min(negative, key=lambda i: coef[i])]
    return tuple(float(c) for c in coef)
