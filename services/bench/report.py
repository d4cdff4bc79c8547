"""What a run leaves behind: the summary table on stdout, the JSON file, the sweep's goodput-vs-rate table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvmesh.services.bench.serve import RunOutcome

ATTAINMENT_TARGET_PCT = 90.0


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_table(summary: dict) -> str:
    """The end-of-run table, as `vllm bench serve` prints it."""
    rows = [("Successful requests", summary["completed"]), ("Failed requests", summary["failed"]),
            ("Benchmark duration (s)", summary["duration_s"]), ("Request throughput (req/s)", summary["request_rps"]),
            ("Output token throughput (tok/s)", summary["output_tok_s"]),
            ("Total token throughput (tok/s)", summary["total_tok_s"]),
            ("Cached prompt tokens", summary["cached_prompt_tokens"]),
            ("Goodput (req/s)", summary["goodput_rps"]), ("SLO attainment (%)", summary["slo_attainment_pct"])]
    lines = ["=" * 20 + " Serving Benchmark Result " + "=" * 20]
    lines += [f"{name:<40}{_fmt(value):>26}" for name, value in rows]
    if summary["errors"]:
        lines.append(f"{'Errors by status':<40}{json.dumps(summary['errors']):>26}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
        lines.append(f"{'-' * 20} {title} {'-' * max(1, 45 - len(title))}")
        for stat in ("mean", "p50", "p90", "p99"):
            lines.append(f"{stat.upper() + ' ' + key.split('_')[0].upper() + ' (ms)':<40}"
                         f"{_fmt(summary[key][stat]):>26}")
    lines.append("=" * 66)
    return "\n".join(lines)


def run_json(outcome: RunOutcome, config: dict) -> dict:
    """The `--out` object: the summary's fields at the top, the run's settings, and every request's timings."""
    return {**outcome.summary, "config": config, "requests": [r.as_json() for r in outcome.results]}


def max_rate_at_target(points: list[tuple[float, dict]], target_pct: float = ATTAINMENT_TARGET_PCT) -> float | None:
    """The highest swept rate whose SLO attainment reached `target_pct` (None when none did)."""
    passing = [rate for rate, s in points if (s["slo_attainment_pct"] or 0.0) >= target_pct]
    return max(passing) if passing else None


def sweep_table(points: list[tuple[float, dict]]) -> str:
    """Goodput and attainment against the offered rate, one row per run, and the max rate at the target."""
    lines = [f"{'rate (req/s)':>12} {'goodput (req/s)':>16} {'attainment %':>13} {'TTFT p99 ms':>12} "
             f"{'TPOT p99 ms':>12} {'failed':>7}"]
    for rate, s in points:
        lines.append(f"{_fmt(rate):>12} {_fmt(s['goodput_rps']):>16} {_fmt(s['slo_attainment_pct'], 1):>13} "
                     f"{_fmt(s['ttft_ms']['p99'], 1):>12} {_fmt(s['tpot_ms']['p99'], 1):>12} {s['failed']:>7}")
    best = max_rate_at_target(points)
    lines.append(f"max rate at >= {ATTAINMENT_TARGET_PCT:.0f}% SLO attainment: "
                 + (f"{best:g} req/s" if best is not None else "none of the swept rates"))
    return "\n".join(lines)


def sweep_json(runs: list[tuple[float, RunOutcome]], config: dict) -> dict:
    """The `--out` object of a sweep: each rate's run (as a single run writes it) and the max rate at target."""
    points = [(rate, outcome.summary) for rate, outcome in runs]
    return {"sweep": [{"request_rate": rate, **run_json(outcome, config)} for rate, outcome in runs],
            "max_rate_at_90pct_slo": max_rate_at_target(points), "config": config}


def write_json(path: str | Path, payload: dict) -> None:
    """Write `payload` (NaN-free: percentiles of nothing are null) to `path`."""
    Path(path).write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
