"""`kvmesh up`'s launcher hands the OTEL_* settings to every child, gives each service a metrics port, and no span
is lost when it stops the mesh: with an export delay far longer than the run, only the SIGTERM flush writes them."""

from __future__ import annotations

import argparse
import urllib.request

import grpc
import pytest

from mesh import free_port
from kvmesh.services import launcher
from kvmesh.services.trace.spans import read_jsonl
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

NUM_ROUTES = 5


def test_plan_gives_every_service_its_own_metrics_port_and_decode_workers_their_flags():
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)  # the flags as `kvmesh up` parses them
    args = parser.parse_args(["--model", "/m", "--threads-per-worker", "1", "--prefill", "2", "--decode", "1",
                              "--cache-decode-kv"])
    children = launcher.plan(args)
    assert [c.name for c in children] == ["scheduler", "cache", "prefill-0", "prefill-1", "decode-0", "gateway"]
    assert [c.name for c in children if "--cache-decode-kv" in c.argv] == ["decode-0"]
    urls = [c.metrics_url for c in children]
    assert len(set(urls)) == len(urls) and urls[-1] == "http://127.0.0.1:8000/metrics"
    for child in children[:-1]:
        port = child.argv[child.argv.index("--metrics-port") + 1]
        assert child.metrics_url == f"http://127.0.0.1:{port}/metrics"
    assert [c.stage for c in children] == [0, 1, 1, 1, 1, 2]


def test_children_inherit_otel_settings_and_flush_every_span_on_stop(tmp_path, monkeypatch):
    spans_file = tmp_path / "spans.jsonl"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jsonl")
    monkeypatch.setenv("KVMESH_TRACES_FILE", str(spans_file))
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # ten minutes: nothing is exported before the stop
    port, metrics_port = free_port(), free_port()
    child = launcher.Child("scheduler", ["scheduler", "--port", str(port), "--metrics-port", str(metrics_port)],
                           f"127.0.0.1:{port}", metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    mesh = launcher.Mesh([child], start_timeout_s=30)
    mesh.start()
    try:
        with grpc.insecure_channel(child.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            for i in range(NUM_ROUTES):  # no workers registered: each is rejected, and traced
                with pytest.raises(grpc.RpcError) as failed:
                    stub.Route(scheduler_pb2.RouteRequest(request_id=f"r{i}", prompt_token_ids=[1, 2, 3]), timeout=5)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        with urllib.request.urlopen(child.metrics_url, timeout=5) as reply:
            text = reply.read().decode()
        assert f'kvmesh:route_rejections_total{{reason="no_workers"}} {NUM_ROUTES}.0' in text
        assert f"kvmesh:route_seconds_count {NUM_ROUTES}.0" in text
        assert not spans_file.exists() or not read_jsonl(spans_file)
    finally:
        mesh.stop()
    assert child.process.returncode == 0
    routes = [s for s in read_jsonl(spans_file) if s.name == "/kvmesh.v1.Scheduler/Route"]
    assert len(routes) == NUM_ROUTES
    assert {s.service for s in routes} == {"kvmesh-scheduler"}
