"""Priority (vLLM's `priority`: lower is more urgent, default 0) over HTTP and gRPC on a saturated 1+1 mesh.

The scheduler admits at most 3 queued requests per decode worker, and those of priority 1 or less urgent only while
fewer than 1 are queued (`--max-queue-per-priority 1:1`). The prefill worker is stopped (SIGSTOP) while the
requests are routed, so the first admitted request stays queued for certain: which requests are admitted is then
decided by their priority alone — at the same load a priority-1 request is refused (429 / RESOURCE_EXHAUSTED with
a retry-after, the message naming its priority's limit), a priority-0 one admitted. Once the prefill worker runs
again every admitted request completes and its blocks come back. A priority that is not a bounded integer is a 400
/ INVALID_ARGUMENT naming the field."""

import concurrent.futures
import os
import signal
import time

import grpc
import httpx

from mesh import start_mesh

MAX_TOKENS = 8
PROMPT = [5, 17, 29, 41, 53, 65, 77, 89]
ENV = {"KVMESH_SCHEDULER_MAX_QUEUE": "3", "KVMESH_SCHEDULER_MAX_QUEUE_PER_PRIORITY": "1:1"}


def grpc_generate(mesh, priority):
    try:
        return mesh.generate(PROMPT, MAX_TOKENS, timeout=120, ignore_eos=True, priority=priority)[0]
    except grpc.RpcError as e:
        return e


def http_complete(mesh, priority, timeout=120):
    return httpx.post(f"{mesh.http_base}/completions", timeout=timeout,
                      json={"prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                            "temperature": 0, "priority": priority})


def wait_handoffs(mesh, count, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if mesh.worker_stats(mesh.decodes[0], "decode").num_handoffs >= count:
            return True
        time.sleep(0.05)
    return False


def test_priorities_are_admitted_in_order_over_http_and_grpc_and_a_bad_priority_is_refused(model_dir):
    mesh = start_mesh(str(model_dir("llama")), lease_s=10.0, env=ENV, worker_args=("--handoff-lease-s", "60"))
    prefill = mesh.prefills[0].proc
    try:
        bad = httpx.post(f"{mesh.http_base}/completions", timeout=30,
                         json={"prompt": "hi", "max_tokens": 2, "priority": "high"})
        assert bad.status_code == 400 and "priority" in bad.json()["error"]["message"], bad.text
        try:
            grpc_generate_error = mesh.generate(PROMPT, 2, timeout=30, priority=2_000_000)
        except grpc.RpcError as e:
            grpc_generate_error = e
        assert isinstance(grpc_generate_error, grpc.RpcError), grpc_generate_error
        assert grpc_generate_error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "priority must be an integer in [-1000000, 1000000]" in grpc_generate_error.details()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            os.kill(prefill.pid, signal.SIGSTOP)
            try:
                first = pool.submit(grpc_generate, mesh, 1)  # admitted: nothing queued yet
                assert wait_handoffs(mesh, 1), "the first request never reached the decode worker"
                low_http = http_complete(mesh, 1, timeout=60)  # one queued: priority 1's limit
                low_grpc = grpc_generate(mesh, 5)
                high = [pool.submit(http_complete, mesh, 0), pool.submit(grpc_generate, mesh, -1)]
                assert wait_handoffs(mesh, 3), "the urgent requests were not admitted beside the queued one"
            finally:
                os.kill(prefill.pid, signal.SIGCONT)
            results = [first.result(), *(f.result() for f in high)]
        assert low_http.status_code == 429, low_http.text
        assert "the limit for priority 1" in low_http.json()["error"]["message"]
        assert low_http.headers["Retry-After"].isdigit()
        assert isinstance(low_grpc, grpc.RpcError) and low_grpc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit for priority 5" in low_grpc.details()
        assert dict(low_grpc.trailing_metadata()).get("retry-after", "").isdigit()
        first_tokens, http_reply, urgent_tokens = results
        assert len(first_tokens) == MAX_TOKENS and len(urgent_tokens) == MAX_TOKENS
        assert http_reply.status_code == 200, http_reply.text
        assert http_reply.json()["usage"]["completion_tokens"] == MAX_TOKENS
        assert mesh.wait_blocks_free(15)
    finally:
        mesh.close()
