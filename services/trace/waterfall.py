"""Drawing traces: a text waterfall for the terminal and a matplotlib one for a PNG."""

from __future__ import annotations

from kvmesh.services.common import conventions as names
from kvmesh.services.trace.breakdown import Breakdown
from kvmesh.services.trace.spans import Trace

NAME_WIDTH = 46


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}ms"


def _bar(offset: float, duration: float, total: float, width: int, ttft_col: int | None) -> str:
    cells = [" "] * width
    if ttft_col is not None and 0 <= ttft_col < width:
        cells[ttft_col] = "┆"
    if total > 0:
        first = min(int(offset / total * width), width - 1)
        last = max(first + 1, min(round((offset + duration) / total * width), width))
        cells[first:last] = "█" * (last - first)
    return "|" + "".join(cells) + "|"


def render_text(trace: Trace, result: Breakdown | None = None, width: int = 50) -> str:
    """One header line, one line per span (indented by parent) and the TTFT breakdown."""
    t0 = trace.start
    total = max(max(s.end for s in trace.spans) - t0, 1e-9)
    request = trace.request_span()
    ttft_col = None
    if result is not None:
        ttft_col = int((request.start - t0 + result.ttft) / total * width)
    header = f"trace {trace.trace_id}"
    if trace.request_id():
        header += f"  request {trace.request_id()}"
    header += f"  total {total * 1e3:.2f} ms"
    if result is not None:
        header += f"  TTFT {result.ttft * 1e3:.2f} ms" + ("" if result.ttft_measured else " (request duration)")
    lines = [header, f"{'offset':>11} {'duration':>11}  {'span':<{NAME_WIDTH}} {'timeline (┆ = first token)'}"]
    for depth, span in trace.walk():
        label = "  " * depth + span.name
        if span.service:
            label += f" [{span.service.removeprefix('kvmesh-')}]"
        label = label[:NAME_WIDTH]
        lines.append(f"{_ms(span.start - t0)} {_ms(span.duration)}  {label:<{NAME_WIDTH}} "
                     f"{_bar(span.start - t0, span.duration, total, width, ttft_col)}")
    if result is not None:
        lines.append(render_breakdown(result))
    return "\n".join(lines)


def render_breakdown(result: Breakdown) -> str:
    """`TTFT 250.00 ms = queue 10.00 ms (4.0 %) + …`, phases in priority order, other last."""
    parts = []
    for phase in names.PHASES + (names.OTHER,):
        seconds = result.phases[phase]
        share = seconds / result.ttft * 100 if result.ttft > 0 else 0.0
        parts.append(f"{phase} {seconds * 1e3:.2f} ms ({share:.1f} %)")
    return f"TTFT {result.ttft * 1e3:.2f} ms = " + " + ".join(parts)


def render_summary(summary: dict[str, dict[str, float]], count: int) -> str:
    """A table of p50 / p99 / mean per phase over `count` requests."""
    lines = [f"{count} requests", f"{'phase':<10} {'p50':>12} {'p99':>12} {'mean':>12}"]
    for name, stats in summary.items():
        lines.append(f"{name:<10} " + " ".join(_ms(stats[k]).rjust(12) for k in ("p50", "p99", "mean")))
    return "\n".join(lines)


PHASE_COLOURS = {"prefill": "tab:blue", "transfer": "tab:orange", "cache": "tab:green", "queue": "tab:red",
                 "other": "tab:gray"}


def save_png(traces: list[tuple[Trace, Breakdown | None]], path: str) -> None:
    """One waterfall panel per trace, bars coloured by TTFT phase, a dashed line at the first token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvmesh.services.trace.breakdown import phase_of

    heights = [max(len(t.spans), 1) * 0.3 + 1 for t, _ in traces]
    fig, axes = plt.subplots(len(traces), 1, figsize=(11, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (trace, result) in zip(axes[:, 0], traces):
        t0 = trace.start
        rows = list(trace.walk())
        for row, (depth, span) in enumerate(rows):
            colour = PHASE_COLOURS.get(phase_of(span) or "other")
            ax.barh(row, span.duration * 1e3, left=(span.start - t0) * 1e3, color=colour)
        ax.set_yticks(range(len(rows)), ["· " * d + s.name for d, s in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms since the request started")
        title = f"trace {trace.trace_id[:16]}… request {trace.request_id() or '-'}"
        if result is not None:
            ax.axvline((trace.request_span().start - t0 + result.ttft) * 1e3, color="black", linestyle="--")
            title += f"  TTFT {result.ttft * 1e3:.1f} ms"
        ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLOURS.values()]
    axes[0, 0].legend(handles, list(PHASE_COLOURS), fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_summary_png(results: list[Breakdown], path: str) -> None:
    """Each request's TTFT as one stacked bar of its phases, requests sorted by TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(results, key=lambda b: b.ttft)
    fig, ax = plt.subplots(figsize=(11, 4 + len(ordered) * 0.02))
    left = [0.0] * len(ordered)
    for phase, colour in PHASE_COLOURS.items():
        widths = [b.phases[phase] * 1e3 for b in ordered]
        ax.barh(range(len(ordered)), widths, left=left, color=colour, label=phase, height=1.0)
        left = [a + w for a, w in zip(left, widths)]
    ax.set_xlabel("TTFT (ms), split into phases")
    ax.set_ylabel("requests, by TTFT")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
