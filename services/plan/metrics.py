"""What a simulated run predicts: TTFT and TPOT percentiles, SLO attainment and goodput (DistServe's
definition: requests per second that meet both the TTFT and the TPOT target)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvmesh.services.plan.sim import SimResult


@dataclass(frozen=True)
class SLO:
    """Latency targets, milliseconds."""

    ttft_ms: float
    tpot_ms: float


@dataclass(frozen=True)
class Prediction:
    """A run's figures: goodput (requests/s within both SLOs over the run's span, first arrival to last
    finish, as `vllm bench serve` counts it), attainment (fraction of all requests within both), percentiles."""

    num_requests: int
    num_rejected: int
    goodput_rps: float
    attainment: float
    duration_s: float
    ttft_ms: dict
    tpot_ms: dict


def request_latencies(result: SimResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ttft_ms, tpot_ms, served mask) per request; TPOT of a one-token reply is 0 (it has no decode step)."""
    arrival = np.asarray(result.arrival_s)
    first = np.asarray(result.first_token_s)
    finish = np.asarray(result.finish_s)
    served = ~np.asarray(result.rejected, dtype=bool) & (finish >= 0)
    steps = np.maximum(np.asarray(result.output_length) - 1, 1)
    ttft = (first - arrival) * 1000.0
    tpot = np.where(np.asarray(result.output_length) > 1, (finish - first) * 1000.0 / steps, 0.0)
    return ttft, tpot, served


def _percentiles(values: np.ndarray) -> dict:
    if not len(values):
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
            "mean": round(float(values.mean()), 3)}


def predict(result: SimResult, slo: SLO) -> Prediction:
    """The figures of one run under slo."""
    ttft, tpot, served = request_latencies(result)
    ok = served & (ttft <= slo.ttft_ms) & (tpot <= slo.tpot_ms)
    n = len(served)
    ends = np.asarray(result.finish_s)[served]
    start = min(result.arrival_s) if n else 0.0
    duration = float(max(ends.max() if len(ends) else 0.0, max(result.arrival_s, default=0.0)) - start)
    goodput = float(ok.sum()) / duration if duration > 0 else float(ok.sum())
    return Prediction(n, int((~served).sum()), goodput, float(ok.sum()) / n if n else 0.0, duration,
                      _percentiles(ttft[served]), _percentiles(tpot[served]))
