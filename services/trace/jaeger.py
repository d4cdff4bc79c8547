"""Spans from Jaeger's HTTP query API (the one its UI uses: /api/traces), as `Span`s."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

from kvmesh.services.common import conventions as names
from kvmesh.services.trace.spans import Span, TraceFileError

GATEWAY_SERVICE = "kvmesh-gateway"


def _get(url: str, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return json.load(reply)
    except OSError as exc:
        raise TraceFileError(f"Jaeger query {url} failed: {exc}") from exc


def _tags(items: list[dict]) -> dict:
    return {t["key"]: t.get("value") for t in items or ()}


def parse_jaeger_trace(data: dict) -> list[Span]:
    """Spans of one trace object from `{"data": [trace, …]}`; Jaeger times are microseconds."""
    processes = data.get("processes", {})
    spans = []
    for raw in data.get("spans", []):
        parent = next((r["spanID"] for r in raw.get("references") or ()
                       if r.get("refType") == "CHILD_OF"), None)
        start = raw["startTime"] / 1e6
        events = []
        for log in raw.get("logs") or ():
            fields = _tags(log.get("fields"))
            events.append((fields.get("event", ""), log["timestamp"] / 1e6))
        spans.append(Span(
            trace_id=raw["traceID"].lower().rjust(32, "0"),
            span_id=raw["spanID"].lower(),
            parent_id=parent.lower() if parent else None,
            name=raw["operationName"],
            start=start,
            end=start + raw["duration"] / 1e6,
            service=processes.get(raw.get("processID"), {}).get("serviceName", ""),
            attributes=_tags(raw.get("tags")),
            events=tuple(events),
        ))
    return spans


def fetch_trace(base_url: str, trace_id: str, timeout: float = 10.0) -> list[Span]:
    """Every span of one trace id."""
    reply = _get(f"{base_url.rstrip('/')}/api/traces/{trace_id}", timeout)
    return [s for t in reply.get("data") or () for s in parse_jaeger_trace(t)]


def search(base_url: str, request_id: str | None = None, limit: int = 200, lookback: str = "1h",
           service: str = GATEWAY_SERVICE, timeout: float = 10.0) -> list[Span]:
    """Spans of recent requests through the gateway, optionally only those tagged with one request id."""
    query = {"service": service, "limit": str(limit), "lookback": lookback}
    if request_id is not None:
        query["tags"] = json.dumps({names.ATTR_REQUEST_ID: request_id})
    else:
        query["operation"] = names.REQUEST_SPAN
    reply = _get(f"{base_url.rstrip('/')}/api/traces?{urllib.parse.urlencode(query)}", timeout)
    return [s for t in reply.get("data") or () for s in parse_jaeger_trace(t)]
