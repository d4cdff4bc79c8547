"""OpenTelemetry tracing for every kvmesh service: one setup call, interceptors, context carriers.

A service calls `setup(service_name, role, instance_id)` once at start and `shutdown()` on SIGTERM (it flushes the
batch processor so no span is lost). Exporters are chosen by the standard variables alone:

- `OTEL_TRACES_EXPORTER`: comma-separated list of `otlp`, `console`, `jsonl`, `none`. Unset means `none` (a
  deliberate departure from the spec's `otlp` default, so tests and laptops never dial a missing collector); spans
  still get real ids and the trace context still crosses every hop.
- `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` /
  `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (`grpc`, the default, or `http/protobuf`): read by the OTLP exporters.
- `KVMESH_TRACES_FILE`: the file the `jsonl` exporter appends to, one span per line (`span.to_json(indent=None)`),
  which `kvmesh trace` reads. Several processes may share one file: each batch is one `O_APPEND` write under a lock.
- `OTEL_SDK_DISABLED=true` turns tracing off altogether.

The span names and attributes the services use are fixed in `kvmesh.services.common.conventions`; the gRPC
interceptors that carry the trace context across hops live in `kvmesh.services.common.rpc_tracing`. This module
imports no gRPC at import time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger(__name__)

TRACER_NAME = "kvmesh"
EXPORTER_NAMES = ("otlp", "console", "jsonl", "none")

_lock = threading.Lock()
_provider: TracerProvider | None = None


class TelemetryConfigError(ValueError):
    """An OTEL_* or KVMESH_TRACES_FILE variable names something this module cannot build."""


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line, safe to share between processes."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        data = "".join(span.to_json(indent=None) + "\n" for span in spans).encode()
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    # O_APPEND makes each write atomic in position; the flock keeps a large batch whole too.
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
        except OSError:
            log.exception("cannot append spans to %s", self.path)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per batch."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def exporter_names(env: dict[str, str] | None = None) -> list[str]:
    """The exporters `OTEL_TRACES_EXPORTER` asks for, validated; [] when tracing exports nothing."""
    env = os.environ if env is None else env
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTER_NAMES]
    if unknown:
        raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter(s) {unknown}; use {EXPORTER_NAMES}")
    return [n for n in names if n != "none"]


def build_exporter(name: str, env: dict[str, str] | None = None) -> SpanExporter:
    """One span exporter by its OTEL_TRACES_EXPORTER name; the OTLP ones read their own OTEL_EXPORTER_OTLP_*."""
    env = os.environ if env is None else env
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "jsonl":
        path = env.get("KVMESH_TRACES_FILE")
        if not path:
            raise TelemetryConfigError("OTEL_TRACES_EXPORTER=jsonl needs KVMESH_TRACES_FILE (the file to append to)")
        return JsonLinesSpanExporter(path)
    if name == "otlp":
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            raise TelemetryConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or http/protobuf")
        return OTLPSpanExporter()
    raise TelemetryConfigError(f"unknown exporter {name!r}")


def build_provider(service_name: str, role: str, instance_id: str,
                   env: dict[str, str] | None = None) -> TracerProvider:
    """A TracerProvider with kvmesh's resource and one BatchSpanProcessor per configured exporter."""
    resource = Resource.create({
        "service.name": f"kvmesh-{service_name}",
        "service.instance.id": instance_id,
        "kvmesh.role": role,
    })
    provider = TracerProvider(resource=resource)
    for name in exporter_names(env):
        provider.add_span_processor(BatchSpanProcessor(build_exporter(name, env)))
    return provider


def setup(service_name: str, role: str, instance_id: str) -> None:
    """Install kvmesh's global TracerProvider once per process; later calls are no-ops."""
    global _provider
    with _lock:
        if _provider is not None:
            return
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return
        _provider = build_provider(service_name, role, instance_id)
        trace.set_tracer_provider(_provider)
        log.debug("tracing: service kvmesh-%s, exporters %s", service_name, exporter_names() or ["none"])


def shutdown() -> None:
    """Flush every pending span and stop the exporters; safe to call twice or without setup()."""
    global _provider
    with _lock:
        provider, _provider = _provider, None
    if provider is not None:
        provider.force_flush()
        provider.shutdown()


def tracer() -> trace.Tracer:
    """kvmesh's tracer (a no-op one until setup() ran)."""
    return trace.get_tracer(TRACER_NAME)


def inject(carrier: dict | None = None) -> dict:
    """Write the current W3C trace context (`traceparent`, `tracestate`) into a plain dict and return it."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier)
    return carrier


def extract(carrier: dict) -> otel_context.Context:
    """The trace context carried by a dict from inject(); pass it as `context=` when starting a span."""
    return propagate.extract(carrier)


def extract_metadata(metadata) -> otel_context.Context:
    """The trace context of gRPC invocation metadata ((key, value) pairs) or HTTP headers (a mapping)."""
    items = metadata.items() if hasattr(metadata, "items") else (metadata or ())
    carrier = {str(k).lower(): v for k, v in items if isinstance(v, str)}
    return propagate.extract(carrier)


def has_span(ctx: otel_context.Context | None = None) -> bool:
    """True when ctx (default: the current context) holds a valid span, local or remote."""
    return trace.get_current_span(ctx).get_span_context().is_valid


def record_span(name: str, start_ns: int, end_ns: int, attributes: dict | None = None,
                context: otel_context.Context | None = None) -> trace.Span:
    """A span for something already measured (a queue wait, a compute window): started and ended at once.

    Times are `time.time_ns()` values; the parent is the current span unless `context` is given.
    """
    span = tracer().start_span(name, context=context, start_time=start_ns, attributes=attributes or {})
    span.end(end_time=max(end_ns, start_ns))
    return span


@contextmanager
def kv_transfer_span(backend: str, direction: str, num_bytes: int, num_blocks: int,
                     **attributes) -> Iterator[trace.Span]:
    """A `kv.transfer` span with the conventional attributes (bandwidth set at the end) and the transfer metrics.

    `direction` is "send" or "recv"; extra keyword attributes are set as `kvmesh.kv.<name>` (e.g. layer=3).
    """
    from kvmesh.services.common import metrics
    from kvmesh.services.common import conventions as names

    attrs = {names.ATTR_KV_BACKEND: backend, names.ATTR_KV_DIRECTION: direction,
             names.ATTR_KV_BYTES: num_bytes, names.ATTR_KV_BLOCKS: num_blocks}
    attrs.update({f"kvmesh.kv.{key}": value for key, value in attributes.items()})
    start = time.perf_counter()
    with tracer().start_as_current_span(names.KV_TRANSFER, attributes=attrs) as span:
        yield span
        seconds = time.perf_counter() - start
        span.set_attribute(names.ATTR_KV_GBPS, num_bytes / seconds / 1e9 if seconds > 0 else 0.0)
    metrics.observe_kv_transfer(backend, direction, num_bytes, seconds)
