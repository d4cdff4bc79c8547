"""The gateway's root span and latency metrics, the server-side trace filter and the context carriers."""

import time

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kvmesh.services.common import conventions as names
from kvmesh.services.common import metrics, rpc_tracing, telemetry
from kvmesh.services.gateway.observe import RequestObserver

TRACE_ID, SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"


@pytest.fixture
def exported(monkeypatch):
    provider = telemetry.build_provider("gateway", "gateway", "g", {})
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", lambda: provider.get_tracer("t"))
    yield exporter
    provider.shutdown()


def _count(histogram) -> float:
    return next(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count"))


def test_observer_sets_ttft_itl_and_tokens_and_observes_the_histograms(exported):
    before = [_count(h) for h in (metrics.TIME_TO_FIRST_TOKEN, metrics.E2E_REQUEST_LATENCY,
                                  metrics.TIME_PER_OUTPUT_TOKEN, metrics.INTER_TOKEN_LATENCY)]
    arrival = time.time_ns()
    observer = RequestObserver("r1", 7, arrival, telemetry.extract_metadata((("traceparent", TRACEPARENT),)))
    time.sleep(0.02)
    observer.token(1)
    for _ in range(3):
        time.sleep(0.005)
        observer.token(1)
    observer.finish()
    observer.finish()  # idempotent
    (span,) = exported.get_finished_spans()
    assert span.name == names.REQUEST_SPAN and span.start_time == arrival
    assert format(span.context.trace_id, "032x") == TRACE_ID and format(span.parent.span_id, "016x") == SPAN_ID
    attrs = span.attributes
    assert attrs[names.ATTR_REQUEST_ID] == "r1" and attrs[names.ATTR_PROMPT_TOKENS] == 7
    assert attrs[names.ATTR_OUTPUT_TOKENS] == 4
    assert 0.02 <= attrs[names.ATTR_TTFT_S] < attrs[names.ATTR_E2E_S]
    assert 0.004 < attrs[names.ATTR_MEAN_ITL_S] < attrs[names.ATTR_TTFT_S]
    assert [e.name for e in span.events] == [names.EVENT_FIRST_TOKEN]
    after = [_count(h) for h in (metrics.TIME_TO_FIRST_TOKEN, metrics.E2E_REQUEST_LATENCY,
                                 metrics.TIME_PER_OUTPUT_TOKEN, metrics.INTER_TOKEN_LATENCY)]
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1, 3]


def test_a_failed_request_keeps_its_status_and_observes_no_ttft(exported):
    before = _count(metrics.TIME_TO_FIRST_TOKEN)
    observer = RequestObserver("r2", 3)
    observer.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
    observer.finish()
    (span,) = exported.get_finished_spans()
    assert span.parent is None and not span.status.is_ok
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert names.ATTR_TTFT_S not in span.attributes and span.attributes[names.ATTR_OUTPUT_TOKENS] == 0
    assert _count(metrics.TIME_TO_FIRST_TOKEN) == before


def test_record_span_takes_the_measured_window_and_the_current_parent(exported):
    tracer = telemetry.tracer()
    with tracer.start_as_current_span("parent") as parent:
        telemetry.record_span(names.PREFILL_QUEUE, 1_000, 5_000, {"a": 1})
        telemetry.record_span(names.PREFILL_COMPUTE, 9_000, 8_000)  # an end before the start is clamped
    queue, compute, _ = exported.get_finished_spans()
    assert (queue.start_time, queue.end_time, queue.attributes["a"]) == (1_000, 5_000, 1)
    assert queue.parent.span_id == parent.get_span_context().span_id
    assert compute.end_time == compute.start_time == 9_000


def test_extract_metadata_reads_grpc_pairs_and_http_headers():
    for carrier in ((("traceparent", TRACEPARENT), ("bin-bin", b"\x00")), {"Traceparent": TRACEPARENT}):
        ctx = telemetry.extract_metadata(carrier)
        assert telemetry.has_span(ctx)
    assert not telemetry.has_span(telemetry.extract_metadata(()))


def test_the_gateway_and_kv_data_rpcs_get_no_server_span_but_clients_still_propagate():
    def details(method):
        return grpc.aio.ClientCallDetails(method, None, None, None, None)

    server, client = rpc_tracing.untraced_filter(server=True), rpc_tracing.untraced_filter()
    for method in ("/kvmesh.v1.Gateway/Generate", "/kvmesh.v1.KVTransfer/Push"):
        assert not server(details(method)) and client(details(method))
    assert server(details("/kvmesh.v1.Decode/Generate")) and server(details("/kvmesh.v1.Gateway/Tokenize"))


def test_prefill_continues_the_trace_context_field_when_metadata_carried_none():
    import asyncio
    from types import SimpleNamespace

    from opentelemetry import trace

    from kvmesh.services.prefill.worker import PrefillWorker
    from kvmesh.v1 import prefill_pb2

    async def main():
        engine = SimpleNamespace(set_layer_hook=lambda fn: None)
        worker = PrefillWorker(SimpleNamespace(engine=engine), sender=None, lease_s=1.0)

        async def seen(request, timeout):
            return trace.get_current_span().get_span_context()

        worker._prefill = seen
        with_field = await worker.prefill(prefill_pb2.PrefillRequest(trace_context={"traceparent": TRACEPARENT}), 1)
        without = await worker.prefill(prefill_pb2.PrefillRequest(), 1)
        return with_field, without, trace.get_current_span().get_span_context()

    with_field, without, after = asyncio.run(main())
    assert format(with_field.trace_id, "032x") == TRACE_ID and format(with_field.span_id, "016x") == SPAN_ID
    assert not without.is_valid and not after.is_valid
