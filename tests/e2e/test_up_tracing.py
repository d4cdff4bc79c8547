"""`kvmesh up` hands the OTEL_* settings to every child, prints a metrics address per service, and no span is lost
when it stops the mesh: with an export delay far longer than the run, only the SIGTERM flush can write them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from mesh import free_port
from kvmesh.services.trace import conventions as names
from kvmesh.services.trace.spans import group_traces, read_jsonl

SERVICES = {"kvmesh-gateway", "kvmesh-scheduler", "kvmesh-decode", "kvmesh-prefill"}


def test_up_once_flushes_one_whole_trace_on_stop(model_dir, tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(spans_file),
           "OTEL_BSP_SCHEDULE_DELAY": "600000", "KVMESH_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "kvmesh.services.cli", "up", "--model", str(model_dir("llama")), "--once", "Hello",
           "--max-tokens", "4", "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--lease-s", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    urls = dict(re.findall(r"kvmesh up: (\S+)\s+serving on \S+, metrics (http://\S+/metrics)", done.stdout))
    assert set(urls) == {"scheduler", "cache", "prefill-0", "decode-0", "gateway"}, done.stdout
    assert len(set(urls.values())) == len(urls)

    spans = read_jsonl(spans_file)
    roots = [s for s in spans if s.name == names.REQUEST_SPAN]
    assert len(roots) == 1
    trace = group_traces(s for s in spans if s.trace_id == roots[0].trace_id)[roots[0].trace_id]
    ids = {s.span_id for s in trace.spans}
    assert [s.name for s in trace.spans if s.parent_id not in ids] == [names.REQUEST_SPAN]
    assert {s.service for s in trace.spans} >= SERVICES
    assert {names.PREFILL_COMPUTE, names.KV_TRANSFER, names.DECODE_STREAM} <= {s.name for s in trace.spans}
    assert roots[0].attributes[names.ATTR_OUTPUT_TOKENS] >= 1
