"""Cost models the scheduler fits online, per worker, from the engine steps its heartbeats report.

One regression per worker over a recent window: step seconds = a + b·prompt tokens + c·attention pairs
+ d·decoding sequences + e·context tokens. Its prompt part is the worker's `PrefillModel` (a, b, c) and its decode
part its `DecodeModel` (a, d, e): the closed forms of `kvmesh plan`, so a colocated worker's mixed steps fit both.
Robust: non-negative least squares on relative errors, then the samples the fit misses by more than a few median
deviations are dropped and the rest refitted. Until a worker has reported enough samples, the priors answer,
scaled to the speed its first steps showed; and for a part its samples never exercised (a prefill worker's decode
part), the priors as they are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from kvmesh.services.cost_model import DecodeModel, PrefillModel, StepShape, least_squares

#: Before a worker's first samples: a CPU of the kind kvmesh is developed on serving a small model (~4,000
#: prompt tokens/s; a 20 ms decode step growing with the batch and its context).
PRIOR_PREFILL = PrefillModel(a=0.005, b=2.5e-4, c=0.0)
PRIOR_DECODE = DecodeModel(a=0.02, b=1e-3, c=1e-6)
WINDOW = 128  # samples kept per worker: recent enough to follow a change of load or machine
MIN_SAMPLES = 8  # fewer: the priors speak
OUTLIER_MADS = 4.0  # a sample whose relative error exceeds this many median deviations is dropped from the fit
MIN_OUTLIER_BAND = 0.1  # ... but never one within 10 % (a near-perfect fit would otherwise reject good samples)


@dataclass(frozen=True)
class StepSample:
    """One reported step: its shape and its wall seconds."""

    shape: StepShape
    seconds: float


@dataclass(frozen=True)
class Fit:
    """A worker's models as of its last refit, and how many samples made (and were refused by) it."""

    prefill: PrefillModel = PRIOR_PREFILL
    decode: DecodeModel = PRIOR_DECODE
    num_samples: int = 0
    num_outliers: int = 0
    prefill_fitted: bool = False  # the prefill part comes from samples (else the prior)


def _row(shape: StepShape) -> tuple[float, ...]:
    return (1.0, float(shape.num_prefill_tokens), float(shape.num_attention_pairs), float(shape.num_decode_seqs),
            float(shape.num_context_tokens))


def fit_steps(samples: list[StepSample], prior: Fit = Fit()) -> Fit:
    """The robust fit of samples; the prior where they are too few, or where a part was never exercised."""
    samples = [s for s in samples if s.seconds > 0]
    if len(samples) < MIN_SAMPLES:
        return scaled_prior(samples, prior)
    rows = np.array([_row(s.shape) for s in samples])
    coef, num_outliers = robust_least_squares(rows, np.array([s.seconds for s in samples]), MIN_SAMPLES)
    a, b, c, d, e = coef
    has_prefill, has_decode = rows[:, 1].any(), rows[:, 3].any()
    prefill = PrefillModel(a, b, c) if has_prefill else prior.prefill
    decode = DecodeModel(a, d, e) if has_decode else prior.decode
    return Fit(prefill, decode, len(samples), num_outliers, bool(has_prefill))


def _prior_seconds(prior: Fit, shape: StepShape) -> float:
    intercept = prior.prefill.a if shape.num_prefill_tokens else prior.decode.a
    return (intercept + prior.prefill.b * shape.num_prefill_tokens + prior.prefill.c * shape.num_attention_pairs
            + prior.decode.b * shape.num_decode_seqs + prior.decode.c * shape.num_context_tokens)


def scaled_prior(samples: list[StepSample], prior: Fit = Fit()) -> Fit:
    """Too few samples to fit the coefficients, enough to say how much slower or faster than the prior this worker
    is: each part of the prior scaled by the median ratio of measured to predicted seconds over the steps that
    exercised it (a part no step exercised takes the other part's ratio: it is one machine). A prior that is 10x
    off this CPU would otherwise steer every route until MIN_SAMPLES steps have been reported. No samples: the
    prior itself."""
    def ratio(steps: list[StepSample]) -> float | None:
        ratios = [s.seconds / p for s in steps if (p := _prior_seconds(prior, s.shape)) > 0]  # a fitted prior's 0s
        return float(np.median(ratios)) if ratios else None

    prefill = ratio([s for s in samples if s.shape.num_prefill_tokens])
    decode = ratio([s for s in samples if not s.shape.num_prefill_tokens and s.shape.num_decode_seqs])
    rp, rd = prefill or decode or 1.0, decode or prefill or 1.0
    p, d = prior.prefill, prior.decode
    return Fit(PrefillModel(p.a * rp, p.b * rp, p.c * rp), DecodeModel(d.a * rd, d.b * rd, d.c * rd), len(samples), 0)


def robust_least_squares(rows: np.ndarray, seconds: np.ndarray, min_samples: int) -> tuple[tuple[float, ...], int]:
    """(coefficients, samples dropped): `least_squares`, then the samples it misses by more than OUTLIER_MADS
    median relative deviations (and more than MIN_OUTLIER_BAND) dropped and the rest refitted, when at least
    `min_samples` remain. Shared by the step models here and the KV link models (links.py)."""
    coef = np.array(least_squares(rows, seconds))
    error = np.abs(rows @ coef / seconds - 1.0)
    band = max(OUTLIER_MADS * float(np.median(error)), MIN_OUTLIER_BAND)
    keep = error <= band
    if min_samples <= keep.sum() < len(seconds):
        coef = np.array(least_squares(rows[keep], seconds[keep]))
    return tuple(float(x) for x in coef), int(len(seconds) - keep.sum())


class StepWindow:
    """A worker's recent step samples and the fit over them (refitted when samples arrive)."""

    def __init__(self, window: int = WINDOW, prior: Fit = Fit()) -> None:
        self.samples: deque[StepSample] = deque(maxlen=window)
        self.prior = prior
        self.fit = prior

    def add(self, samples: Iterable[StepSample]) -> Fit:
        """Record samples; refit when there were any. Returns the fit."""
        new = list(samples)
        if new:
            self.samples.extend(new)
            self.fit = fit_steps(list(self.samples), self.prior)
        return self.fit
