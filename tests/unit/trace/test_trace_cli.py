"""`kvmesh trace` on a span file the real SDK wrote: waterfalls, the TTFT breakdown, the summary, PNG, Jaeger."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from kvmesh.services.cli import main
from kvmesh.services.trace.breakdown import breakdown
from kvmesh.services.trace.spans import group_traces, read_jsonl


def _traces(span_file):
    return group_traces(read_jsonl(span_file))


def _by_request(span_file):
    return {t.request_id(): t for t in _traces(span_file).values()}


def test_remote_parent_hops_keep_one_trace_and_the_tree(span_file):
    traces = _traces(span_file)
    assert len(traces) == 6 and sum(t.has_request for t in traces.values()) == 5
    trace = _by_request(span_file)["r-0"]
    tree = [(depth, span.name, span.service) for depth, span in trace.walk()]
    assert tree[:3] == [(0, "gateway.Generate", "kvmesh-gateway"), (1, "scheduler.route", "kvmesh-gateway"),
                        (1, "decode.admit", "kvmesh-decode")]
    assert (2, "prefill.queue", "kvmesh-prefill") in tree
    assert (2, "prefill.compute", "kvmesh-prefill") in tree
    assert tree.count((3, "kv.transfer", "kvmesh-prefill")) == 3
    assert tree[-1] == (1, "decode.stream", "kvmesh-decode")


@pytest.mark.parametrize("i", range(5))
def test_breakdown_adds_up_to_ttft(span_file, expected_ms, i):
    result = breakdown(_by_request(span_file)[f"r-{i}"])
    scale = 1 + i / 10
    assert result.ttft_measured and result.ttft == pytest.approx(0.2 * scale)
    assert sum(result.phases.values()) == pytest.approx(result.ttft, rel=0.05)
    for phase, ms in expected_ms.items():
        assert result.phases[phase] * 1e3 == pytest.approx(ms * scale, abs=0.01), phase


def test_waterfall_by_request_id(span_file, capsys):
    assert main(["trace", str(span_file), "--request-id", "r-2"]) == 0
    out = capsys.readouterr().out
    assert "request r-2" in out and "TTFT 240.00 ms" in out
    lines = out.splitlines()
    compute = next(line for line in lines if "prefill.compute" in line)
    # offset 50 ms and duration 120 ms, scaled by 1.2; indented two levels under the root
    assert re.match(r"\s+60\.00ms\s+144\.00ms      prefill\.compute \[prefill\]\s+\|", compute), compute
    assert compute.index("prefill.compute") > next(l for l in lines if "decode.admit" in l).index("decode.admit")
    bar = compute[compute.index("|"):]
    assert len(bar) == 52 and "█" in bar
    assert ("TTFT 240.00 ms = prefill 144.00 ms (60.0 %) + transfer 18.00 ms (7.5 %) + cache 24.00 ms (10.0 %)"
            " + queue 30.00 ms (12.5 %) + other 24.00 ms (10.0 %)") in out


def test_waterfall_by_trace_id(span_file, capsys):
    trace = _by_request(span_file)["r-1"]
    assert main(["trace", str(span_file), "--trace-id", "0x" + trace.trace_id]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"trace {trace.trace_id}  request r-1")
    assert out.count("kv.transfer") == 3


def test_slowest_orders_by_root_duration(span_file, capsys):
    assert main(["trace", str(span_file), "--slowest", "2"]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trace ")]
    assert [re.search(r"request (r-\d)", h).group(1) for h in headers] == ["r-4", "r-3"]


def test_summary_gives_percentiles_per_phase(span_file, capsys):
    assert main(["trace", str(span_file), "--summary"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert out.startswith("5 requests")
    # scales 1.0 … 1.4: p50 at 1.2, p99 at 1.396
    assert rows["ttft"][0] == "240.00ms" and rows["prefill"][0] == "144.00ms"
    assert float(rows["prefill"][1].removesuffix("ms")) == pytest.approx(120 * 1.396, abs=0.02)
    assert set(rows) == {"ttft", "prefill", "transfer", "cache", "queue", "other"}


def test_unknown_request_and_missing_file(span_file, tmp_path, capsys):
    assert main(["trace", str(span_file), "--request-id", "nope"]) == 1
    assert main(["trace", str(tmp_path / "absent.jsonl")]) == 2
    assert "KVMESH_TRACES_FILE" in capsys.readouterr().err


def test_png(span_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "w.png"
    assert main(["trace", str(span_file), "--slowest", "2", "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    summary = tmp_path / "s.png"
    assert main(["trace", str(span_file), "--summary", "--png", str(summary)]) == 0
    assert summary.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary.stat().st_size > 5000


def _as_jaeger(spans: list[dict]) -> dict:
    """The file's spans in the shape of Jaeger's /api/traces answer (microseconds, tags, references)."""
    from kvmesh.services.trace.spans import parse_otel_json

    traces, processes = {}, {}
    for raw in spans:
        span = parse_otel_json(raw)
        pid = processes.setdefault(span.service, f"p{len(processes) + 1}")
        traces.setdefault(span.trace_id, []).append({
            "traceID": span.trace_id, "spanID": span.span_id, "operationName": span.name,
            "references": [{"refType": "CHILD_OF", "traceID": span.trace_id, "spanID": span.parent_id}]
            if span.parent_id else [],
            "startTime": round(span.start * 1e6), "duration": round(span.duration * 1e6),
            "tags": [{"key": k, "type": "string", "value": v} for k, v in span.attributes.items()],
            "logs": [], "processID": pid})
    procs = {pid: {"serviceName": name, "tags": []} for name, pid in processes.items()}
    return {tid: {"traceID": tid, "spans": s, "processes": procs} for tid, s in traces.items()}


@pytest.fixture
def fake_jaeger(span_file):
    traces = _as_jaeger([json.loads(line) for line in span_file.read_text().splitlines()])
    queries = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            queries.append((url.path, parse_qs(url.query)))
            if url.path.startswith("/api/traces/"):
                data = [traces[url.path.rsplit("/", 1)[1]]]
            else:
                tags = json.loads(parse_qs(url.query).get("tags", ["{}"])[0])
                data = [t for t in traces.values() if all(
                    any(tag["key"] == k and tag["value"] == v for s in t["spans"] for tag in s["tags"])
                    for k, v in tags.items())]
            body = json.dumps({"data": data}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", queries
    server.shutdown()
    server.server_close()


def test_jaeger_request_id_query(fake_jaeger, capsys):
    url, queries = fake_jaeger
    assert main(["trace", "--jaeger", url, "--request-id", "r-3"]) == 0
    out = capsys.readouterr().out
    assert "request r-3" in out and "TTFT 260.00 ms" in out
    path, query = queries[0]
    assert path == "/api/traces" and query["service"] == ["kvmesh-gateway"]
    assert json.loads(query["tags"][0]) == {"kvmesh.request_id": "r-3"}


def test_jaeger_summary_matches_the_file(fake_jaeger, span_file, capsys):
    url, _ = fake_jaeger
    assert main(["trace", "--jaeger", url, "--summary"]) == 0
    from_jaeger = capsys.readouterr().out
    assert main(["trace", str(span_file), "--summary"]) == 0
    assert from_jaeger == capsys.readouterr().out
