"""Per-request timings and what they add up to: TTFT, TPOT, ITL, E2E percentiles, throughput and goodput.

Definitions follow `vllm bench serve` and DistServe: TTFT is send → first token; TPOT is (E2E − TTFT) / (output
tokens − 1), per request; ITL is every gap between two token-carrying messages of a stream; goodput is the
completed requests per second that met the TTFT and the TPOT SLO together, and SLO attainment the share of all
requests (failed ones count against it) that did.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    """One request's measurements; times are seconds, `start_s` from the start of the run, the rest from the
    request's own send."""

    session: int = 0
    turn: int = 0
    prompt_tokens: int = 0
    output_tokens_asked: int = 0
    scheduled_s: float = 0.0
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # arrival of each token-carrying message
    output_tokens: int = 0
    cached_tokens: int | None = None
    error: str | None = None  # the status ("http_503", "UNAVAILABLE", "incomplete", …) when it failed

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:])]

    def as_json(self) -> dict:
        """Every field, plus the derived TPOT and ITL (seconds, as the fields)."""
        out = asdict(self)
        out["tpot_s"], out["itl_s"] = self.tpot_s, self.itl_s
        return out


@dataclass(frozen=True)
class Slo:
    """Targets a request must meet together to count toward goodput; None means no bound."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met(self, result: RequestResult) -> bool:
        """Completed, first token within `ttft_ms`, and time per output token within `tpot_ms` (a one-token reply
        has no TPOT, so only its TTFT counts)."""
        if not result.ok or result.ttft_s is None:
            return False
        if self.ttft_ms is not None and result.ttft_s * 1000 > self.ttft_ms:
            return False
        tpot = result.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1000 <= self.tpot_ms


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0–100), linearly interpolated between order statistics (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def distribution_ms(values_s: list[float]) -> dict:
    """mean, p50, p90, p99 (and the sample count) of times in seconds, reported in milliseconds."""
    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "count": 0}
    ms = [v * 1000 for v in values_s]
    return {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "count": len(ms)}


def summarize(results: list[RequestResult], duration_s: float, slo: Slo = Slo()) -> dict:
    """The aggregate of a run: counts, throughputs, latency distributions, goodput and SLO attainment."""
    done = [r for r in results if r.ok]
    duration = max(duration_s, 1e-9)
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    good = sum(1 for r in done if slo.met(r))
    cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
    return {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration_s,
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "request_rps": len(done) / duration, "output_tok_s": output / duration,
        "total_tok_s": (output + prompt) / duration, "prompt_tokens": prompt, "output_tokens": output,
        "cached_prompt_tokens": sum(cached) if cached else None,
        "goodput_rps": good / duration,
        "slo_attainment_pct": 100.0 * good / len(results) if results else None,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done if r.e2e_s is not None]),
    }
