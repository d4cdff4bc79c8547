"""Every RPC of every service, fuzzed on a real mesh: hypothesis-made messages of the right type with hostile
values, and random bytes that are no message at all. Each call must be answered with a status a client can act
on — never UNKNOWN or INTERNAL, never a traceback or a parser's text — and at the end every service still serves,
no traceback is in any log, and the mesh answers a real request with the same tokens as before.

The budget is fixed (KVMESH_FUZZ_EXAMPLES per method, derandomised); bench/RESULTS.md records a longer run.
"""

from __future__ import annotations

import os
import random
import time

import grpc
import pytest
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings

from mesh import start_mesh
from procs import health_status
from protofuzz import messages
from kvmesh.v1 import cache_pb2, decode_pb2, gateway_pb2, kv_pb2, prefill_pb2, scheduler_pb2

EXAMPLES = int(os.environ.get("KVMESH_FUZZ_EXAMPLES", "40"))
BUDGET = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                  database=None)
CALL_TIMEOUT_S = 3.0
BUGS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
LEAKED_TEXT = ("Traceback", "Exception calling application", "DecodeError", "Error parsing", "recvmsg")
SERVICES = {  # service -> (module, the mesh process that hosts it)
    "Gateway": (gateway_pb2, "gateway"), "Scheduler": (scheduler_pb2, "scheduler"), "Cache": (cache_pb2, "cache"),
    "Prefill": (prefill_pb2, "prefill"), "Decode": (decode_pb2, "decode"), "KVTransfer": (kv_pb2, "decode"),
}
METHODS = [(s, m.name) for s, (module, _) in SERVICES.items()
           for m in module.DESCRIPTOR.services_by_name[s].methods]
PROMPT = list(range(5, 40))


@pytest.fixture(scope="module")
def mesh(model_dir):
    mesh = start_mesh(str(model_dir("llama")), lease_s=2.0)
    yield mesh
    mesh.close()


def _address(mesh, host: str) -> str:
    return {"gateway": mesh.gateway, "scheduler": mesh.scheduler, "cache": mesh.cache,
            "prefill": mesh.prefills[0], "decode": mesh.decodes[0]}[host].address


def _invoke(mesh, service: str, method_name: str, payload: bytes) -> grpc.RpcError | None:
    """Send raw bytes as the request of service.method (streaming or not); the error, or None on success."""
    module, host = SERVICES[service]
    method = module.DESCRIPTOR.services_by_name[service].methods_by_name[method_name]
    path = f"/kvmesh.v1.{service}/{method_name}"
    channel = mesh.channel(_address(mesh, host))
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kinds[(method.client_streaming, method.server_streaming)](path, request_serializer=lambda b: b,
                                                                      response_deserializer=lambda b: b)
    request = iter([payload]) if method.client_streaming else payload
    try:
        reply = call(request, timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            for _ in reply:
                pass
    except grpc.RpcError as e:
        return e
    return None


def _check(error: grpc.RpcError | None, what: str) -> None:
    if error is None:
        return
    assert error.code() not in BUGS, f"{what}: {error.code().name}: {error.details()}"
    details = error.details() or ""
    assert not any(text in details for text in LEAKED_TEXT), f"{what}: internal text reached the client: {details}"


@pytest.mark.parametrize(("service", "method_name"), METHODS, ids=[f"{s}.{m}" for s, m in METHODS])
def test_hostile_messages_and_random_bytes_get_a_status_a_client_can_act_on(mesh, service, method_name):
    module, _ = SERVICES[service]
    method = module.DESCRIPTOR.services_by_name[service].methods_by_name[method_name]
    rng = random.Random(f"{service}.{method_name}")
    for size in (1, 3, 17, 200, 4000) * max(1, EXAMPLES // 20):  # not a message (or, rarely, a strange one)
        _check(_invoke(mesh, service, method_name, rng.randbytes(size)), f"{service}.{method_name}(random bytes)")

    @BUDGET
    @given(messages(method.input_type, GetMessageClass))
    def fuzz(message):
        _check(_invoke(mesh, service, method_name, message.SerializeToString()), f"{service}.{method_name}({message})")

    fuzz()


def test_after_the_fuzz_every_service_serves_and_answers_as_before(mesh):
    for proc in [mesh.gateway, mesh.scheduler, mesh.cache, *mesh.prefills, *mesh.decodes]:
        assert health_status(proc.address) == "SERVING", proc.service
        assert proc.proc.poll() is None, f"{proc.service} died: {proc.stderr[-3000:]}"
    time.sleep(3.0)  # fake workers the fuzz registered lapse (lease 2 s, no heartbeats)
    tokens, _ = mesh.generate(PROMPT, max_tokens=6)
    assert len(tokens) == 6
    assert mesh.wait_blocks_free(30), "a fuzzed call left KV blocks, a handoff or a transfer behind"
    for proc in [mesh.gateway, mesh.scheduler, mesh.cache, *mesh.prefills, *mesh.decodes]:
        assert "Traceback" not in proc.stderr, f"{proc.service}: {proc.stderr[-4000:]}"
