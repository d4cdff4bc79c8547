"""TTFT split into queue / prefill / transfer / cache / other, per request and as percentiles over many."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common import conventions as names
from kvmesh.services.trace.spans import Span, Trace


@dataclass(frozen=True)
class Breakdown:
    """One request's TTFT and the seconds of it each phase took; the phases add up to `ttft`."""

    trace_id: str
    request_id: str | None
    ttft: float
    phases: dict[str, float]  # every name in names.PHASES plus names.OTHER
    ttft_measured: bool  # False: no kvmesh.ttft_s or first_token event, the request span's duration stands in


def phase_of(span: Span) -> str | None:
    """The TTFT phase a span counts towards, or None."""
    phase = span.attributes.get(names.ATTR_PHASE)
    if phase in names.PHASES:
        return phase
    return names.PHASE_OF_SPAN.get(span.name)


def measured_ttft(request: Span) -> float | None:
    """TTFT from `kvmesh.ttft_s`, else from a `first_token` event on the request span."""
    value = request.attributes.get(names.ATTR_TTFT_S)
    if value is not None:
        return float(value)
    for event_name, when in request.events:
        if event_name == names.EVENT_FIRST_TOKEN:
            return when - request.start
    return None


def breakdown(trace: Trace) -> Breakdown:
    """Attribute every instant of the TTFT window to its highest-priority open phase (a sweep over span edges)."""
    request = trace.request_span()
    ttft = measured_ttft(request)
    measured = ttft is not None
    if ttft is None:
        ttft = request.duration
    t0, t1 = request.start, request.start + ttft
    edges = []
    for span in trace.spans:
        phase = phase_of(span)
        start, end = max(span.start, t0), min(span.end, t1)
        if phase is not None and end > start:
            edges += [(start, 1, phase), (end, -1, phase)]
    edges.sort(key=lambda e: (e[0], e[1]))
    totals = dict.fromkeys(names.PHASES + (names.OTHER,), 0.0)
    open_count = dict.fromkeys(names.PHASES, 0)
    cursor = t0
    for when, delta, phase in edges:
        totals[_top(open_count)] += when - cursor
        cursor = when
        open_count[phase] += delta
    totals[names.OTHER] += max(t1 - cursor, 0.0)
    return Breakdown(trace.trace_id, trace.request_id(), ttft, totals, measured)


def _top(open_count: dict[str, int]) -> str:
    for phase in names.PHASES:
        if open_count[phase] > 0:
            return phase
    return names.OTHER


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(breakdowns: list[Breakdown]) -> dict[str, dict[str, float]]:
    """{"ttft" | phase: {"p50": s, "p99": s, "mean": s}} over many requests."""
    columns = {"ttft": [b.ttft for b in breakdowns]}
    for phase in names.PHASES + (names.OTHER,):
        columns[phase] = [b.phases[phase] for b in breakdowns]
    return {name: {"p50": percentile(v, 50), "p99": percentile(v, 99), "mean": sum(v) / len(v)}
            for name, v in columns.items()}
