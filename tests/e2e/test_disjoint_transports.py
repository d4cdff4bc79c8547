"""A prefill worker and a decode worker with no transport backend in common (--transport shm and --transport grpc)
are never paired: a request gets UNAVAILABLE / 503 naming what each side offers, instead of a route whose KV
transfer must fail; the workers stay healthy."""

import time

import grpc
import httpx

from mesh import Mesh, free_port
from procs import health_status
from kvmesh.v1 import scheduler_pb2


def test_workers_without_a_common_backend_are_not_paired(model_dir, procs):
    model = str(model_dir("llama"))
    scheduler = procs.start("scheduler")
    common = ["--scheduler", scheduler.address, "--model", model, "--kv-cache-bytes", str(16 * 2**20)]
    prefill = procs.launch("prefill", *common, "--transport", "shm")
    decode = procs.launch("decode", *common, "--transport", "grpc")
    for proc in (prefill, decode):
        proc.wait_serving(120)
    http_port = free_port()
    gateway = procs.start("gateway", "--scheduler", scheduler.address, "--model", model, "--http-port",
                          str(http_port), timeout_s=120)
    mesh = Mesh(procs, scheduler, None, [prefill], [decode], gateway, http_port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (mesh.workers(scheduler_pb2.WORKER_ROLE_PREFILL)
                                                and mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)):
        time.sleep(0.05)
    try:
        mesh.generate([5, 6, 7, 8], 4)
        raise AssertionError("a pair with no common transport backend was routed a request")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert "shares a transport backend" in e.details() and "shm on host" in e.details(), e.details()
        assert "grpc on host" in e.details(), e.details()
    refused = httpx.post(f"{mesh.http_base}/completions", json={"prompt": "Once", "max_tokens": 4}, timeout=60)
    assert refused.status_code == 503 and "transport backend" in refused.json()["error"]["message"]
    assert health_status(prefill.address) == "SERVING" and health_status(decode.address) == "SERVING"
    for channel in mesh.channels.values():
        channel.close()
