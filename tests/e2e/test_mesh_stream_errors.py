"""Never a silent success, with real processes: a decode worker killed mid-stream ends every client's request with
an explicit error (an OpenAI error event and no [DONE], an HTTP 503 with a message, a gRPC UNAVAILABLE), counted
by cause; a gateway stopped with SIGTERM lets streams finish, or ends those past its grace period with an error."""

import json
import os
import signal
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh import start_mesh
from kvmesh.v1 import common_pb2, gateway_pb2, scheduler_pb2

LONG = 900  # tokens: far more than can be generated between reading the first one and stopping the worker


@pytest.fixture(scope="module")
def mesh(model_dir):
    # migration off: these tests are of the error a client sees when a stream cannot go on (test_migration.py
    # has the streams that do go on)
    m = start_mesh(str(model_dir("llama")), env={"KVMESH_GATEWAY_MIGRATION_LIMIT": "0"})
    m.model = str(model_dir("llama"))
    yield m
    m.close()


def body(max_tokens: int, stream: bool, **extra) -> dict:
    return {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, **extra}


def failures(http_port: int, api: str, stage: str, code: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "kvmesh:request_failures_total"
                    and sample.labels == {"api": api, "stage": stage, "code": code}):
                return sample.value
    return 0.0


def kill_decode(mesh) -> None:
    """SIGKILL the mesh's decode worker (stopped first, so no stream can finish in between) and put a fresh one in
    its place, registered and the only decode worker the scheduler routes to."""
    dead = mesh.decodes[0]
    os.kill(dead.proc.pid, signal.SIGSTOP)
    os.kill(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait(10)
    fresh = mesh.procs.start("decode", "--scheduler", mesh.scheduler.address, "--model", mesh.model,
                             "--kv-cache-bytes", str(64 * 2**20), "--handoff-lease-s", "5", timeout_s=120)
    mesh.decodes[0] = fresh
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the dead one's lease lapses; the fresh one registers
        if [w.address for w in mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)] == [fresh.address]:
            return
        time.sleep(0.1)
    raise AssertionError("the fresh decode worker is not the only one routed to within 20 s")


def wait_decoding(mesh) -> None:
    deadline = time.monotonic() + 30
    while mesh.worker_stats(mesh.decodes[0], "decode").num_running < 1:
        assert time.monotonic() < deadline, "the request never started decoding"
        time.sleep(0.02)


def test_decode_killed_mid_stream_ends_the_sse_stream_with_an_openai_error_event_and_no_done(mesh):
    before = failures(mesh.http_port, "http", "after_first_token", "UNAVAILABLE")
    with httpx.stream("POST", f"{mesh.http_base}/completions", json=body(LONG, True), timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        kill_decode(mesh)
        rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert json.loads(first[len("data: "):])["choices"][0]["text"] is not None
    assert "[DONE]" not in rest
    error = json.loads(rest[-1])["error"]
    assert error["code"] == 503 and error["type"] == "server_error" and "decode worker" in error["message"]
    assert failures(mesh.http_port, "http", "after_first_token", "UNAVAILABLE") == before + 1
    assert mesh.wait_blocks_free(10)  # the prefill worker's blocks too


def test_decode_killed_mid_request_gives_a_non_streaming_client_503_with_a_message(mesh):
    import threading

    before = failures(mesh.http_port, "http", "after_first_token", "UNAVAILABLE")
    replies = []
    thread = threading.Thread(target=lambda: replies.append(
        httpx.post(f"{mesh.http_base}/completions", json=body(LONG, False), timeout=60)))
    thread.start()
    wait_decoding(mesh)
    kill_decode(mesh)
    thread.join(60)
    reply = replies[0]
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == 503 and "decode worker" in error["message"]
    assert failures(mesh.http_port, "http", "after_first_token", "UNAVAILABLE") == before + 1
    assert mesh.wait_blocks_free(10)


def test_decode_killed_mid_stream_gives_a_grpc_client_unavailable(mesh):
    before = failures(mesh.http_port, "rpc", "after_first_token", "UNAVAILABLE")
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=LONG, ignore_eos=True)
    call = mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(prompt="Once upon a time", sampling=sampling),
                                        timeout=60)
    assert next(call).token_ids
    kill_decode(mesh)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "decode worker" in info.value.details()
    assert not any(text in info.value.details() for text in ("recvmsg", "Socket closed", "errno", "ipv4:"))
    assert failures(mesh.http_port, "rpc", "after_first_token", "UNAVAILABLE") == before + 1
    assert mesh.wait_blocks_free(10)


def start_gateway(mesh, grace_s: float):
    from mesh import free_port

    http_port = free_port()
    gateway = mesh.procs.start("gateway", "--scheduler", mesh.scheduler.address, "--model", mesh.model,
                               "--http-port", str(http_port), "--grace-s", str(grace_s), timeout_s=120)
    return gateway, f"http://127.0.0.1:{http_port}/v1"


def test_sigterm_on_the_gateway_lets_an_http_stream_finish_with_done(mesh):
    gateway, base = start_gateway(mesh, grace_s=60)
    with httpx.stream("POST", f"{base}/completions", timeout=60,
                      json=body(200, True, stream_options={"include_usage": True})) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        gateway.proc.send_signal(signal.SIGTERM)
        rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["usage"]["completion_tokens"] == 200
    assert gateway.wait(30) == 0
    with pytest.raises(httpx.TransportError):  # gone: its port refuses new requests
        httpx.post(f"{base}/completions", json=body(4, False), timeout=10)


def test_sigterm_on_the_gateway_ends_a_stream_past_its_grace_period_with_an_error_event(mesh):
    gateway, base = start_gateway(mesh, grace_s=1)
    decode = mesh.decodes[0]
    try:
        with httpx.stream("POST", f"{base}/completions", json=body(LONG, True), timeout=60) as reply:
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            os.kill(decode.proc.pid, signal.SIGSTOP)  # the stream cannot finish now
            gateway.proc.send_signal(signal.SIGTERM)
            rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    finally:
        os.kill(decode.proc.pid, signal.SIGCONT)
    assert "[DONE]" not in rest
    error = json.loads(rest[-1])["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
    assert gateway.wait(30) == 0
    assert mesh.wait_blocks_free(15)  # the decode worker, resumed, frees the cut request's blocks


def test_a_handoff_that_lapses_while_its_kv_is_written_ends_with_a_status_and_no_traceback(model_dir):
    # every layer is held back 2 s and the handoff lease is 1 s: the lease lapses while the KV is being written
    lapsing = start_mesh(str(model_dir("llama")), chaos="delay=2s", worker_args=("--handoff-lease-s", "1"))
    try:
        with pytest.raises(grpc.RpcError) as info:
            lapsing.generate([1, 2, 3, 4, 5], max_tokens=4, timeout=60)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert "lapsed" in info.value.details()
        assert lapsing.wait_blocks_free(15)  # on the decode worker and, once its late writes end, the prefill's
        decode = lapsing.decodes[0]
        assert "Traceback" not in decode.stderr and "KeyError" not in decode.stderr, decode.stderr
    finally:
        lapsing.close()
