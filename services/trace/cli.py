"""The `kvmesh trace` sub-command: pick requests from a span file or Jaeger and draw them."""

from __future__ import annotations

import argparse
import os
import sys

from kvmesh.services.trace import jaeger
from kvmesh.services.trace.breakdown import breakdown, summarize
from kvmesh.services.trace.spans import Trace, TraceFileError, group_traces, read_jsonl
from kvmesh.services.trace.waterfall import render_summary, render_text, save_png, save_summary_png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `kvmesh trace`'s flags."""
    parser.add_argument("file", nargs="?", default=os.environ.get("KVMESH_TRACES_FILE"),
                        help="JSON-lines span file (default: $KVMESH_TRACES_FILE)")
    parser.add_argument("--jaeger", metavar="URL", help="query Jaeger's HTTP API (e.g. http://127.0.0.1:16686) "
                        "instead of reading a file")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--trace-id", help="show the trace with this id (32 hex digits)")
    pick.add_argument("--request-id", help="show the request whose spans carry kvmesh.request_id=ID")
    pick.add_argument("--slowest", type=int, metavar="N", help="show the N slowest requests (by root duration)")
    pick.add_argument("--summary", action="store_true", help="p50/p99 of each TTFT phase over all requests "
                      "(the default)")
    parser.add_argument("--png", metavar="FILE", help="also draw into a PNG (needs matplotlib): the "
                        "waterfalls, or with --summary each request's TTFT as stacked phases")
    parser.add_argument("--width", type=int, default=50, help="width of the terminal bars in characters")
    parser.add_argument("--limit", type=int, default=200, help="Jaeger: how many recent requests to fetch")
    parser.add_argument("--lookback", default="1h", help="Jaeger: how far back to search (e.g. 15m, 2h)")


def _load(args: argparse.Namespace) -> dict[str, Trace]:
    if args.jaeger:
        if args.trace_id:
            spans = jaeger.fetch_trace(args.jaeger, args.trace_id)
        else:
            spans = jaeger.search(args.jaeger, request_id=args.request_id, limit=args.limit, lookback=args.lookback)
    elif args.file:
        spans = read_jsonl(args.file)
    else:
        raise TraceFileError("give a span file, set KVMESH_TRACES_FILE, or use --jaeger URL")
    return group_traces(spans)


def requests(traces: dict[str, Trace]) -> list[Trace]:
    """The traces of client requests (with a `gateway.Generate` span); every trace when none has one."""
    found = [t for t in traces.values() if t.has_request]
    return found or list(traces.values())


def select(traces: dict[str, Trace], args: argparse.Namespace) -> list[Trace]:
    """The traces the flags ask for (may be empty)."""
    if args.trace_id:
        wanted = args.trace_id.lower().removeprefix("0x").rjust(32, "0")
        return [traces[wanted]] if wanted in traces else []
    if args.request_id:
        return [t for t in traces.values() if t.request_id() == args.request_id]
    return sorted(requests(traces), key=lambda t: t.duration, reverse=True)[:args.slowest]


def run(args: argparse.Namespace) -> int:
    """Print the chosen waterfalls (or the summary); 1 when nothing matched."""
    try:
        traces = _load(args)
    except TraceFileError as exc:
        print(f"kvmesh trace: {exc}", file=sys.stderr)
        return 2
    if not (args.trace_id or args.request_id or args.slowest):
        results = [breakdown(t) for t in requests(traces)]
        if not results:
            print("kvmesh trace: no requests found", file=sys.stderr)
            return 1
        print(render_summary(summarize(results), len(results)))
        if args.png:
            save_summary_png(results, args.png)
            print(f"phases per request written to {args.png}")
        return 0
    chosen = select(traces, args)
    if not chosen:
        print("kvmesh trace: no matching trace", file=sys.stderr)
        return 1
    drawn = [(t, breakdown(t)) for t in chosen]
    print("\n\n".join(render_text(t, b, args.width) for t, b in drawn))
    if args.png:
        save_png(drawn, args.png)
        print(f"waterfall written to {args.png}")
    return 0
