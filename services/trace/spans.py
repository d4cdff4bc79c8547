"""Spans as `kvmesh trace` sees them, read from the JSON-lines file, grouped into traces and trees."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, Iterator

from kvmesh.services.common import conventions as names


class TraceFileError(ValueError):
    """The span file is missing or holds a line that is not an exported span."""


@dataclass(frozen=True)
class Span:
    """One finished span; times are seconds since the epoch, ids lower-case hex without 0x."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start: float
    end: float
    service: str = ""
    attributes: dict = field(default_factory=dict)
    events: tuple = ()  # (name, time) pairs

    @property
    def duration(self) -> float:
        return self.end - self.start


def _hex(value: str | None) -> str | None:
    if not value:
        return None
    return value[2:].lower() if value.startswith("0x") else value.lower()


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse_otel_json(obj: dict) -> Span:
    """A Span from one `ReadableSpan.to_json()` object."""
    return Span(
        trace_id=_hex(obj["context"]["trace_id"]),
        span_id=_hex(obj["context"]["span_id"]),
        parent_id=_hex(obj.get("parent_id")),
        name=obj["name"],
        start=_time(obj["start_time"]),
        end=_time(obj["end_time"]),
        service=obj.get("resource", {}).get("attributes", {}).get("service.name", ""),
        attributes=dict(obj.get("attributes") or {}),
        events=tuple((e["name"], _time(e["timestamp"])) for e in obj.get("events") or ()),
    )


def read_jsonl(path: str | os.PathLike[str]) -> list[Span]:
    """Every span in a JSON-lines file; blank lines are skipped, a torn last line (a writer mid-flush) too."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError as exc:
        raise TraceFileError(f"no span file at {path} (set KVMESH_TRACES_FILE and OTEL_TRACES_EXPORTER=jsonl)") from exc
    spans = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            spans.append(parse_otel_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):
                break
            raise TraceFileError(f"{path}:{number}: not an exported span ({exc})") from exc
    return spans


@dataclass
class Trace:
    """The spans of one trace id, with the tree between them."""

    trace_id: str
    spans: list[Span]

    def __post_init__(self) -> None:
        self.spans.sort(key=lambda s: (s.start, -s.end))
        ids = {s.span_id for s in self.spans}
        self.children: dict[str | None, list[Span]] = {}
        for span in self.spans:
            parent = span.parent_id if span.parent_id in ids else None
            self.children.setdefault(parent, []).append(span)

    @property
    def roots(self) -> list[Span]:
        """Spans whose parent is not in the trace (the parent may be remote and unexported)."""
        return self.children.get(None, [])

    @property
    def start(self) -> float:
        return min(s.start for s in self.spans)

    @property
    def duration(self) -> float:
        """The first root span's duration (the whole extent when roots overlap oddly)."""
        root = self.roots[0]
        return max(root.duration, 0.0)

    @property
    def has_request(self) -> bool:
        """True when the trace holds a `gateway.Generate` span (background work does not)."""
        return any(s.name == names.REQUEST_SPAN for s in self.spans)

    def request_span(self) -> Span:
        """The `gateway.Generate` span, else the first root."""
        for span in self.spans:
            if span.name == names.REQUEST_SPAN:
                return span
        return self.roots[0]

    def request_id(self) -> str | None:
        for span in self.spans:
            if names.ATTR_REQUEST_ID in span.attributes:
                return str(span.attributes[names.ATTR_REQUEST_ID])
        return None

    def walk(self) -> Iterator[tuple[int, Span]]:
        """(depth, span) in tree order, children by start time."""
        stack = [(0, s) for s in reversed(self.roots)]
        while stack:
            depth, span = stack.pop()
            yield depth, span
            stack.extend((depth + 1, c) for c in reversed(self.children.get(span.span_id, [])))


def group_traces(spans: Iterable[Span]) -> dict[str, Trace]:
    """Traces by id, in order of first appearance."""
    by_id: dict[str, list[Span]] = {}
    for span in spans:
        by_id.setdefault(span.trace_id, []).append(span)
    return {tid: Trace(tid, group) for tid, group in by_id.items()}
