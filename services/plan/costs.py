"""The cost models the simulator runs on: fitted once by `kvmesh plan profile`, saved as JSON, loaded by the
planner. Plain numbers and closed forms only — no torch here, so planning needs no model and no engine."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

#: Used when a profile carries no measured transfer figure: the shared-memory copy measured on a 2-core machine
#: of the kind kvmesh is developed on (shared/MACHINE.md: warm segment, ~11 GB/s), rounded down for the
#: checksums and headers a real handoff adds.
DEFAULT_TRANSFER_GBPS = 8.0


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
class Profile:
    """A machine's cost models plus what the simulator needs to price a KV handoff."""

    prefill: PrefillModel
    decode: DecodeModel
    kv_bytes_per_token: int
    transfer_gbps: float = DEFAULT_TRANSFER_GBPS
    model: str = ""
    cpu: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)

    def transfer_seconds(self, num_tokens: int) -> float:
        """Seconds to move num_tokens tokens' KV between two workers."""
        return num_tokens * self.kv_bytes_per_token / (self.transfer_gbps * 1e9)

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (fits, raw samples, CPU)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Read a profile written by `save` (JSON only: a profile is data, never code)."""
        raw = json.loads(Path(path).read_text())
        return cls(PrefillModel(**raw["prefill"]), DecodeModel(**raw["decode"]), int(raw["kv_bytes_per_token"]),
                   float(raw.get("transfer_gbps", DEFAULT_TRANSFER_GBPS)), raw.get("model", ""),
                   raw.get("cpu", {}), raw.get("samples", {}))


def _least_squares(rows: Sequence[Sequence[float]], seconds: Sequence[float]) -> tuple[float, float, float]:
    """Non-negative least squares over three features, on relative errors: a negative coefficient would make a
    bigger batch faster, which no engine does, and would send the simulator's step times below zero at the
    grid's edges; and the samples span orders of magnitude, so absolute errors would let the one slowest shape
    decide every coefficient."""
    y = np.asarray(seconds, dtype=float)
    x = np.asarray(rows, dtype=float) / y[:, None]
    y = np.ones_like(y)
    active = [0, 1, 2]
    while True:
        coef = np.zeros(3)
        coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return float(coef[0]), float(coef[1]), float(coef[2])
        active = [i for i in active if i != min(negative, key=lambda i: coef[i])]


def fit_prefill(prompt_batches: Sequence[Sequence[int]], seconds: Sequence[float]) -> PrefillModel:
    """Fit a + b·Σn + c·Σn² to steps that each prefilled the whole prompts of lengths prompt_batches[i]."""
    rows = [(1.0, float(sum(batch)), float(sum(n * n for n in batch))) for batch in prompt_batches]
    return PrefillModel(*_least_squares(rows, seconds))


def fit_decode(batches: Sequence[int], context_tokens: Sequence[int], seconds: Sequence[float]) -> DecodeModel:
    """Fit a + b·batch + c·context_tokens to measured decode steps."""
    rows = [(1.0, float(b), float(c)) for b, c in zip(batches, context_tokens)]
    return DecodeModel(*_least_squares(rows, seconds))
