"""Every path a request can end on frees what it took, on every worker: cancel, a dead or hung peer."""

import os
import signal
import threading
import time

import grpc
import httpx
import pytest

from mesh import start_mesh
from kvmesh.v1 import common_pb2, gateway_pb2, scheduler_pb2

LONG = common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def mesh(model_dir):
    m = start_mesh(str(model_dir("llama")))
    yield m
    m.close()


def test_client_cancel_frees_every_block_within_a_second(mesh):
    call = mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(prompt="Once upon a time", sampling=LONG),
                                        timeout=60)
    got = [next(call) for _ in range(3)]
    assert all(r.token_ids for r in got)
    assert not mesh.all_blocks_free()  # the request holds blocks while it streams
    call.cancel()
    assert mesh.wait_blocks_free(1.0)
    logs = "".join(line for p in mesh.decodes + mesh.prefills + [mesh.gateway] for line in p.stderr_lines)
    assert "Traceback" not in logs  # a stream cut short unwinds quietly


def test_http_client_disconnect_frees_every_block_within_a_second(mesh):
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{mesh.http_base}/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    assert mesh.wait_blocks_free(1.0)


def test_cancel_of_a_non_streaming_http_request_frees_blocks(mesh):
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{mesh.http_base}/completions", json=body, timeout=0.3)
    assert mesh.wait_blocks_free(1.5)


def _send_in_background(mesh, prompt: str, results: list) -> threading.Thread:
    def send():
        start = time.monotonic()
        try:
            list(mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(prompt=prompt, sampling=LONG), timeout=30))
            results.append(("ok", None, time.monotonic() - start))
        except grpc.RpcError as e:
            results.append((e.code(), e.details(), time.monotonic() - start))

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_prefill_killed_before_pushing_kv_gives_unavailable_and_frees_blocks(model_dir):
    mesh = start_mesh(str(model_dir("llama")), chaos="delay=2s", lease_s=2.0)
    try:
        results = []
        thread = _send_in_background(mesh, "The capital of France is", results)
        time.sleep(1.0)  # the prefill worker is holding its first layer back (chaos delay)
        os.kill(mesh.prefills[0].proc.pid, signal.SIGKILL)
        thread.join(10)
        code, details, seconds = results[0]
        assert code == grpc.StatusCode.UNAVAILABLE and "prefill worker" in details
        assert seconds < 5
        s = mesh.worker_stats(mesh.decodes[0], "decode")
        assert s.num_free_blocks == s.num_total_blocks and s.num_handoffs == 0
        deadline = time.monotonic() + 5
        while mesh.workers(scheduler_pb2.WORKER_ROLE_PREFILL) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mesh.workers(scheduler_pb2.WORKER_ROLE_PREFILL) == []  # its lease lapsed: no longer routed to
        with pytest.raises(grpc.RpcError) as info:
            mesh.generate([1, 2, 3], 2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        mesh.close()


def test_hung_prefill_fails_the_request_within_the_lease(model_dir):
    mesh = start_mesh(str(model_dir("llama")), worker_args=("--prefill-timeout-s", "3"))
    try:
        os.kill(mesh.prefills[0].proc.pid, signal.SIGSTOP)
        results = []
        _send_in_background(mesh, "Hello", results).join(20)
        code, details, seconds = results[0]
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), details
        assert seconds < 8  # the handoff lease is 5 s, the prefill deadline 3 s
        s = mesh.worker_stats(mesh.decodes[0], "decode")
        assert s.num_free_blocks == s.num_total_blocks and s.num_handoffs == 0 and s.num_transfers == 0
    finally:
        os.kill(mesh.prefills[0].proc.pid, signal.SIGCONT)
        mesh.close()


def test_decode_killed_mid_transfer_frees_the_prefill_workers_blocks(model_dir):
    mesh = start_mesh(str(model_dir("llama")), chaos="delay=1s")
    try:
        results = []
        thread = _send_in_background(mesh, "The capital of France is", results)
        time.sleep(0.6)
        os.kill(mesh.decodes[0].proc.pid, signal.SIGKILL)
        thread.join(10)
        assert results[0][0] == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            s = mesh.worker_stats(mesh.prefills[0], "prefill")
            if s.num_free_blocks == s.num_total_blocks and s.num_handoffs == 0 and s.num_transfers == 0:
                break
            time.sleep(0.1)
        assert s.num_free_blocks == s.num_total_blocks and s.num_handoffs == 0 and s.num_transfers == 0
    finally:
        mesh.close()


def test_sigterm_on_a_decode_worker_drains_its_streams_then_exits_zero(model_dir):
    mesh = start_mesh(str(model_dir("llama")))
    try:
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
        call = mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(prompt="Hello", sampling=sampling),
                                            timeout=60)
        got = [next(call) for _ in range(3)]
        mesh.decodes[0].proc.send_signal(signal.SIGTERM)
        got += list(call)
        assert sum(len(r.token_ids) for r in got) == 300 and got[-1].finish_reason
        assert mesh.decodes[0].wait(15) == 0
    finally:
        mesh.close()
