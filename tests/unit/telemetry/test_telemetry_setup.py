"""Tracing setup: exporters from OTEL_* variables, the JSON-lines file, and the trace id crossing a gRPC hop."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from kvmesh.services.common import rpc_tracing, telemetry

SCRIPT = Path(__file__).with_name("traced_proc.py")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trace_id_crosses_a_grpc_hop_between_processes_sharing_one_file(tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(spans_file)}
    server = subprocess.Popen([sys.executable, str(SCRIPT), "server"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        port = int(server.stdout.readline())
        subprocess.run([sys.executable, str(SCRIPT), "client", str(port)], env=env, check=True, timeout=30)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    spans = {s["name"]: s for s in _lines(spans_file)}
    assert set(spans) == {"gateway.Generate", "/kvmesh.test.Echo/Echo", "prefill.compute"}, "no health-check span"
    assert len({s["context"]["trace_id"] for s in spans.values()}) == 1
    client_rpc = [s for s in _lines(spans_file) if s["name"] == "/kvmesh.test.Echo/Echo"]
    assert len(client_rpc) == 2, "one client span (gateway) and one server span (prefill)"
    by_service = {s["resource"]["attributes"]["service.name"]: s for s in client_rpc}
    server_span, client_span = by_service["kvmesh-prefill"], by_service["kvmesh-gateway"]
    assert server_span["parent_id"] == client_span["context"]["span_id"]
    assert client_span["parent_id"] == spans["gateway.Generate"]["context"]["span_id"]
    assert spans["prefill.compute"]["parent_id"] == server_span["context"]["span_id"]
    assert server_span["resource"]["attributes"]["kvmesh.role"] == "prefill"
    assert server_span["resource"]["attributes"]["service.instance.id"] == "prefill-0"


def test_exporter_names_from_environment():
    assert telemetry.exporter_names({}) == []
    assert telemetry.exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert telemetry.exporter_names({"OTEL_TRACES_EXPORTER": "otlp, jsonl"}) == ["otlp", "jsonl"]
    with pytest.raises(telemetry.TelemetryConfigError, match="zipkin"):
        telemetry.exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_jsonl_without_a_file_is_a_clear_error():
    with pytest.raises(telemetry.TelemetryConfigError, match="KVMESH_TRACES_FILE"):
        telemetry.build_provider("x", "x", "x", {"OTEL_TRACES_EXPORTER": "jsonl"})


@pytest.mark.parametrize("protocol, module", [
    ("grpc", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
    ("http/protobuf", "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
])
def test_otlp_protocol_picks_the_exporter(protocol, module):
    exporter = telemetry.build_exporter("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol})
    assert type(exporter).__module__ == module
    exporter.shutdown()


def test_provider_has_kvmesh_resource_and_one_processor_per_exporter(tmp_path):
    env = {"OTEL_TRACES_EXPORTER": "console,jsonl", "KVMESH_TRACES_FILE": str(tmp_path / "t.jsonl")}
    provider = telemetry.build_provider("decode", "decode", "d-7", env)
    attrs = provider.resource.attributes
    assert (attrs["service.name"], attrs["service.instance.id"], attrs["kvmesh.role"]) == (
        "kvmesh-decode", "d-7", "decode")
    processors = provider._active_span_processor._span_processors
    assert len(processors) == 2 and all(isinstance(p, BatchSpanProcessor) for p in processors)
    provider.shutdown()


def test_jsonl_exporter_appends_whole_lines(tmp_path):
    path = tmp_path / "deep" / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(path)}
    for round_ in range(2):
        provider = telemetry.build_provider("cache", "cache", "c", env)
        tracer = provider.get_tracer("t")
        for i in range(50):
            with tracer.start_as_current_span("cache.get") as span:
                span.set_attribute("i", round_ * 50 + i)
        provider.shutdown()
    assert sorted(s["attributes"]["i"] for s in _lines(path)) == list(range(100))


def test_inject_extract_carries_the_trace_through_a_dict(tmp_path):
    provider = telemetry.build_provider("t", "t", "t", {})
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("kv.transfer") as parent:
        carrier = telemetry.inject({"request_id": "r"})
    assert carrier["traceparent"].split("-")[1] == format(parent.get_span_context().trace_id, "032x")
    with tracer.start_as_current_span("decode.admit", context=telemetry.extract(carrier)) as child:
        assert child.parent.span_id == parent.get_span_context().span_id
    assert trace.get_current_span() is trace.INVALID_SPAN
    provider.shutdown()


def test_setup_is_idempotent_and_shutdown_flushes(tmp_path):
    spans_file = tmp_path / "s.jsonl"
    code = (
        "from kvmesh.services.common import telemetry as t\n"
        "t.setup('scheduler', 'scheduler', 's-1'); p = t._provider; t.setup('other', 'other', 'o')\n"
        "assert t._provider is p\n"
        "with t.tracer().start_as_current_span('scheduler.route'): pass\n"
        "t.shutdown(); t.shutdown()\n")
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(spans_file),
           "OTEL_BSP_SCHEDULE_DELAY": "600000"}  # only shutdown's flush can write the span
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    (span,) = _lines(spans_file)
    assert span["name"] == "scheduler.route"
    assert span["resource"]["attributes"]["service.name"] == "kvmesh-scheduler"


def test_interceptors_keep_stream_cancellation_and_deadlines():
    out = subprocess.run([sys.executable, str(SCRIPT.with_name("stream_proc.py"))], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["got"] == [0, 1, 2]
    assert result["server_cancelled"], "a client cancel must reach the server handler through the interceptors"
    assert result["deadline"] == "DEADLINE_EXCEEDED"
    spans = result["spans"]
    assert [(n, k) for n, k, _ in spans] == [("/kvmesh.test.Stream/Tokens", "CLIENT")] * 2 + [
        ("/kvmesh.test.Stream/Tokens", "SERVER")] * 2
    assert len({t for _, _, t in spans}) == 2, "client and server span of one call share its trace id"


def test_health_heartbeat_and_excluded_services_stay_untraced(monkeypatch):
    import grpc

    monkeypatch.setenv("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "kvmesh.v1.Cache")
    keep = rpc_tracing.untraced_filter()

    def details(method):
        return grpc.aio.ClientCallDetails(method, None, None, None, None)

    assert keep(details("/kvmesh.v1.Gateway/Generate"))
    assert keep(details("/kvmesh.v1.Scheduler/Route"))
    assert not keep(details("/kvmesh.v1.Scheduler/Heartbeat"))
    assert not keep(details("/grpc.health.v1.Health/Check"))
    assert not keep(details("/kvmesh.v1.Cache/Lookup"))


def test_kv_transfer_span_sets_conventional_attributes_and_metrics(tmp_path):
    spans_file = tmp_path / "kv.jsonl"
    code = (
        "import time, sys\n"
        "from kvmesh.services.common import telemetry as t, metrics as m\n"
        "assert 'grpc' not in sys.modules, 'telemetry must not pull gRPC into transports'\n"
        "t.setup('prefill', 'prefill', 'p')\n"
        "with t.kv_transfer_span('shm', 'send', 10_000_000, 8, layer=3):\n"
        "    time.sleep(0.05)\n"
        "t.shutdown()\n"
        "print(m.KV_TRANSFER_BYTES.labels(backend='shm', direction='send')._value.get())\n")
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(spans_file)}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30, capture_output=True,
                         text=True).stdout
    assert float(out) == 10_000_000
    (span,) = _lines(spans_file)
    attrs = span["attributes"]
    assert span["name"] == "kv.transfer"
    assert (attrs["kvmesh.kv.backend"], attrs["kvmesh.kv.direction"], attrs["kvmesh.kv.bytes"],
            attrs["kvmesh.kv.blocks"], attrs["kvmesh.kv.layer"]) == ("shm", "send", 10_000_000, 8, 3)
    assert 0.01 < attrs["kvmesh.kv.gbps"] < 0.2  # 10 MB in a little over 50 ms
