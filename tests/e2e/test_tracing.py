"""One trace per request across every hop, `kvmesh trace` on the exported file, and /metrics on every service —
on a real mesh exporting spans to a JSON-lines file."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
import urllib.request
import uuid

import grpc
import pytest

from mesh import start_mesh, wait_for_trace
from kvmesh.services.common import conventions as names
from kvmesh.services.trace.breakdown import breakdown
from kvmesh.services.trace.spans import read_jsonl
from kvmesh.v1 import common_pb2, gateway_pb2

MAX_TOKENS = 6
PROMPT = list(range(5, 45))  # 40 tokens: 3 blocks of 16
SERVICES = {"kvmesh-gateway", "kvmesh-scheduler", "kvmesh-decode", "kvmesh-prefill", "kvmesh-cache"}
NEEDED = {names.REQUEST_SPAN, names.SCHEDULER_ROUTE, names.DECODE_QUEUE, names.PREFILL_QUEUE,
          names.PREFILL_COMPUTE, names.KV_TRANSFER, names.DECODE_ADMIT, names.DECODE_STREAM}
METRICS_LINE = re.compile(r"kvmesh \S+ metrics on (http://\S+/metrics)")


@pytest.fixture(scope="module")
def traced(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(path), "OTEL_BSP_SCHEDULE_DELAY": "50",
           "KVMESH_METRICS_PORT": "0",
           # every request repeats PROMPT: keep each one's prefill hop (the decode worker's pool would prefill
           # the short tail itself), so each trace covers every service; the skipped blocks are still skipped
           "KVMESH_DECODE_LOCAL_PREFILL_MAX_TOKENS": "0"}
    mesh = start_mesh(str(model_dir("llama")), env=env)
    yield mesh, path
    mesh.close()


def _generate(mesh, request_id: str, metadata=()) -> list[gateway_pb2.GenerateResponse]:
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPT, request_id=request_id, sampling=sampling)
    return list(mesh.gateway_stub().Generate(request, timeout=60, metadata=metadata))


def _trace_of(path, request_id: str, timeout_s: float = 10.0):
    """The trace whose root carries request_id, once every service's spans of it are in the file."""
    return wait_for_trace(path, request_id, lambda trace: {s.service for s in trace.spans} >= SERVICES
                          and {s.name for s in trace.spans} >= NEEDED, timeout_s)


def _assert_single_tree(trace) -> None:
    ids = {s.span_id for s in trace.spans}
    roots = [s for s in trace.spans if s.parent_id not in ids]
    assert [r.name for r in roots] == [names.REQUEST_SPAN], [(s.name, s.service) for s in roots]
    assert len(ids) == len(trace.spans)


def test_one_request_makes_one_trace_covering_every_hop(traced):
    mesh, path = traced
    rid = f"trace-{uuid.uuid4().hex}"
    responses = _generate(mesh, rid)
    assert sum(len(r.token_ids) for r in responses) == MAX_TOKENS
    trace = _trace_of(path, rid)
    _assert_single_tree(trace)
    root = trace.roots[0]
    assert root.parent_id is None
    assert root.attributes[names.ATTR_OUTPUT_TOKENS] == MAX_TOKENS
    assert 0 < root.attributes[names.ATTR_TTFT_S] < root.duration
    assert root.attributes["kvmesh.mean_itl_s"] > 0
    # no span of this request leaked into another trace
    assert not [s for s in read_jsonl(path) if s.attributes.get(names.ATTR_REQUEST_ID) == rid
                and s.trace_id != trace.trace_id]

    by_name = {}
    for span in trace.spans:
        by_name.setdefault(span.name, []).append(span)
    route = by_name[names.SCHEDULER_ROUTE][0]
    assert route.attributes[names.ATTR_ROUTE_DECODE] and route.attributes[names.ATTR_ROUTE_PREFILL]
    stream = by_name[names.DECODE_STREAM][0]
    assert stream.service == "kvmesh-decode" and stream.attributes[names.ATTR_OUTPUT_TOKENS] == MAX_TOKENS
    assert stream.attributes[names.ATTR_TTFT_S] > 0
    assert by_name[names.PREFILL_COMPUTE][0].attributes[names.ATTR_PREFILL_TOKENS] == len(PROMPT)

    kv = by_name[names.KV_TRANSFER]
    direction = names.ATTR_KV_DIRECTION
    sends = [s for s in kv if s.attributes.get(direction) == "send" and names.ATTR_KV_LAYER in s.attributes]
    whole = [s for s in kv if s.attributes.get(direction) == "send" and "kv.bytes" in s.attributes]
    recvs = [s for s in kv if s.attributes.get(direction) == "recv"]  # the receiver's span of the transfer
    assert sends and len(recvs) == 1 and len(whole) == 1
    assert {s.service for s in sends + whole} == {"kvmesh-prefill"} and recvs[0].service == "kvmesh-decode"
    layers = sorted(s.attributes[names.ATTR_KV_LAYER] for s in sends)
    assert layers == list(range(len(layers)))
    for span in sends + whole + recvs:
        assert span.attributes[names.ATTR_KV_BYTES] > 0 and span.attributes[names.ATTR_KV_BACKEND]
        assert span.attributes[names.ATTR_KV_BLOCKS] == 3 and span.attributes[names.ATTR_KV_GBPS] > 0
    assert all("kvmesh.kv.checksum_s" in span.attributes for span in sends)
    moved = whole[0].attributes["kv.bytes"]  # = PrefillResponse.transfer.bytes (the same TransferStats)
    assert sum(s.attributes[names.ATTR_KV_BYTES] for s in sends) == moved == recvs[0].attributes["kv.bytes"]
    assert whole[0].attributes["kv.layers"] == recvs[0].attributes["kv.layers"] == len(layers)
    cache = [s for s in trace.spans if s.service == "kvmesh-cache"]
    assert cache and {s.name for s in cache} >= {"cache.lookup"}  # the prefill worker asked the cache pool


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _assert_continues(trace, trace_id: str, span_id: str) -> None:
    assert trace.trace_id == trace_id
    ids = {s.span_id for s in trace.spans}
    roots = [s for s in trace.spans if s.parent_id not in ids]
    assert [(r.name, r.parent_id) for r in roots] == [(names.REQUEST_SPAN, span_id)]


def test_grpc_traceparent_becomes_the_parent(traced):
    mesh, path = traced
    trace_id, span_id, header = _traceparent()
    rid = f"grpc-{uuid.uuid4().hex}"
    _generate(mesh, rid, metadata=(("traceparent", header),))
    _assert_continues(_trace_of(path, rid), trace_id, span_id)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_http_traceparent_header_becomes_the_parent(traced, stream):
    mesh, path = traced
    trace_id, span_id, header = _traceparent()
    rid = f"http-{uuid.uuid4().hex}"
    body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "request_id": rid,
                       "ignore_eos": True, "stream": stream}).encode()
    request = urllib.request.Request(f"{mesh.http_base}/completions", body, method="POST",
                                     headers={"Content-Type": "application/json", "traceparent": header})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200
        reply.read()
    trace = _trace_of(path, f"{rid}-0")
    _assert_continues(trace, trace_id, span_id)
    assert trace.roots[0].attributes[names.ATTR_OUTPUT_TOKENS] == MAX_TOKENS


def test_kvmesh_trace_slowest_prints_waterfalls_and_ttft_adds_up(traced):
    from kvmesh.services.cli import main

    mesh, path = traced
    rids = [f"slow-{i}-{uuid.uuid4().hex}" for i in range(3)]
    measured = []
    for rid in rids:
        start = time.perf_counter()
        stream = mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, request_id=rid,
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)), timeout=60)
        next(stream)
        measured.append(time.perf_counter() - start)
        list(stream)
    traces = [_trace_of(path, rid) for rid in rids]
    for trace, client_ttft in zip(traces, measured):
        result = breakdown(trace)
        assert result.ttft_measured
        assert sum(result.phases.values()) == pytest.approx(result.ttft, rel=0.05)
        # the gateway's TTFT is the client's, less the client-side hops
        assert result.ttft <= client_ttft and result.ttft == pytest.approx(client_ttft, rel=0.5, abs=0.02)
        assert result.phases["prefill"] > 0 and result.phases["transfer"] > 0 and result.phases["queue"] > 0
        # the spans explain most of the TTFT: what no phase covers is a minority
        # the attribution is the spans': the prefill phase is the compute span (within the TTFT window)
        compute = next(s for s in trace.spans if s.name == names.PREFILL_COMPUTE)
        assert result.phases["prefill"] == pytest.approx(compute.duration, abs=1e-4)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["trace", str(path), "--slowest", "3"]) == 0
    text = out.getvalue()
    assert text.count("trace ") >= 3 and text.count("TTFT") >= 3
    for name in (names.REQUEST_SPAN, names.PREFILL_COMPUTE, names.KV_TRANSFER, names.DECODE_STREAM):
        assert name in text
    assert re.search(r"queue [\d.]+ ms .* prefill|prefill [\d.]+ ms", text)


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def _metric(values: dict[str, float], name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in values.items() if k.split("{")[0] == name and all(w in k for w in want))


def _metrics_url(proc) -> str:
    found = METRICS_LINE.findall(proc.stdout)
    assert found, f"{proc.service} printed no metrics address:\n{proc.stdout}"
    return found[0]


def test_every_service_serves_metrics_with_observed_histograms(traced):
    mesh, _path = traced
    for _ in range(2):
        _generate(mesh, f"metrics-{uuid.uuid4().hex}")
    gateway = _scrape(f"http://127.0.0.1:{mesh.http_port}/metrics")
    for name in ("kvmesh:time_to_first_token_seconds_count", "kvmesh:time_per_output_token_seconds_count",
                 "kvmesh:inter_token_latency_seconds_count", "kvmesh:e2e_request_latency_seconds_count"):
        assert _metric(gateway, name) >= 2, name
    decode = _scrape(_metrics_url(mesh.decodes[0]))
    assert _metric(decode, "kvmesh:kv_transfer_seconds_count", direction="recv") >= 2
    assert _metric(decode, "kvmesh:kv_transfer_bytes_total", direction="recv") > 0
    assert _metric(decode, "kvmesh:request_queue_time_seconds_count", stage="decode") >= 2
    prefill = _scrape(_metrics_url(mesh.prefills[0]))
    assert _metric(prefill, "kvmesh:kv_transfer_seconds_count", direction="send") >= 2
    assert _metric(prefill, "kvmesh:request_prefill_time_seconds_count") >= 2
    assert _metric(prefill, "kvmesh:request_queue_time_seconds_count", stage="prefill") >= 2
    scheduler = _scrape(_metrics_url(mesh.scheduler))
    assert _metric(scheduler, "kvmesh:route_seconds_count") >= 2
    assert _metric(scheduler, "kvmesh:route_decisions_total") >= 2
    cache = _scrape(_metrics_url(mesh.cache))
    assert _metric(cache, "process_cpu_seconds_total") > 0
    # worker gauges follow the heartbeats' load reports
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        workers = [_scrape(_metrics_url(p)) for p in (mesh.decodes[0], mesh.prefills[0])]
        if all(_metric(w, "kvmesh:kv_blocks_free") > 0 for w in workers):
            break
        time.sleep(0.2)
    for values in workers:
        total = _metric(values, "kvmesh:kv_blocks_free") + _metric(values, "kvmesh:kv_blocks_used")
        assert total > 0 and "kvmesh:num_requests_waiting" in values and "kvmesh:num_requests_running" in values


def test_a_cancelled_request_still_ends_its_spans(traced):
    mesh, path = traced
    rid = f"cancel-{uuid.uuid4().hex}"
    stream = mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(
        prompt_token_ids=PROMPT, request_id=rid,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)), timeout=60)
    next(stream)
    stream.cancel()
    deadline = time.monotonic() + 10
    while True:
        spans = read_jsonl(path)
        roots = [s for s in spans if s.attributes.get(names.ATTR_REQUEST_ID) == rid]
        streams = [s for s in spans if roots and s.trace_id == roots[0].trace_id and s.name == names.DECODE_STREAM]
        if roots and streams:
            break
        assert time.monotonic() < deadline, "the cancelled request's spans were not exported"
        time.sleep(0.1)
    assert roots[0].attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert 1 <= roots[0].attributes[names.ATTR_OUTPUT_TOKENS] < 400
    assert streams[0].attributes[names.ATTR_OUTPUT_TOKENS] < 400


def test_a_decode_pool_hit_shows_on_the_decode_queue_and_route_spans(traced):
    mesh, path = traced
    _generate(mesh, f"warm-{uuid.uuid4().hex}")  # PROMPT's two full blocks are now in the decode worker's pool
    deadline = time.monotonic() + 10
    while True:  # and, once a heartbeat carried its KV events, in the scheduler's index
        rid = f"hit-{uuid.uuid4().hex}"
        responses = _generate(mesh, rid)
        trace = _trace_of(path, rid)
        route = next(s for s in trace.spans if s.name == names.SCHEDULER_ROUTE)
        if route.attributes.get(names.ATTR_DECODE_CACHED_TOKENS) == 32:
            break
        assert time.monotonic() < deadline, "the scheduler never reported the decode worker's hit"
        time.sleep(0.2)
    queue = next(s for s in trace.spans if s.name == names.DECODE_QUEUE)
    assert queue.attributes[names.ATTR_DECODE_HIT_BLOCKS] == 2 and queue.attributes[names.ATTR_KV_BLOCKS] == 3
    assert responses[-1].usage.cached_tokens == 32
    sends = [s for s in trace.spans if s.name == names.KV_TRANSFER and names.ATTR_KV_LAYER in s.attributes]
    assert sends and all(s.attributes[names.ATTR_KV_BLOCKS] == 1 for s in sends)  # only the uncached block
