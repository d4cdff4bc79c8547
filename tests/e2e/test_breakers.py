"""Circuit breakers with real processes: a worker SIGKILLed with its lease still running is out of routing as
soon as the first call to it fails and is reported, and the requests that follow succeed on its twin."""

import os
import signal
import time

import grpc
import pytest

from mesh import start_mesh
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

ROLES = {"prefill": scheduler_pb2.WORKER_ROLE_PREFILL, "decode": scheduler_pb2.WORKER_ROLE_DECODE}
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


def _info(mesh, role: int, address: str) -> scheduler_pb2.WorkerInfo | None:
    return next((w for w in mesh.workers(role) if w.address == address), None)


def _fail_once(mesh) -> grpc.RpcError:
    """Send requests one at a time until one fails (routes spread over both workers, so one soon meets the dead
    one); that failure."""
    for _ in range(8):
        try:
            mesh.generate(PROMPT, max_tokens=4)
        except grpc.RpcError as e:
            return e
    raise AssertionError("no request was routed to the killed worker")


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_killed_worker_is_out_of_routing_after_its_first_failed_call(model_dir, role):
    # A lease far longer than the test: the worker stays registered, so only its breaker can keep routes away.
    mesh = start_mesh(str(model_dir("llama")), prefill=2 if role == "prefill" else 1,
                      decode=2 if role == "decode" else 1, lease_s=60.0)
    try:
        victim, twin = (mesh.prefills if role == "prefill" else mesh.decodes)
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        error = _fail_once(mesh)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        deadline = time.monotonic() + 10  # generous for a loaded machine; the lease (60 s) is far off
        while (info := _info(mesh, ROLES[role], victim.address)).breaker_state != scheduler_pb2.BREAKER_STATE_OPEN:
            assert time.monotonic() < deadline, f"breaker of the killed {role} worker never opened: {info}"
            time.sleep(0.02)
        assert info.num_breaker_opened == 1 and info.lease_remaining_seconds > 30  # the breaker, not the lease
        scheduler = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
        for i in range(8):
            route = scheduler.Route(scheduler_pb2.RouteRequest(request_id=f"r{i}", prompt_token_ids=PROMPT), timeout=5)
            assert victim.address not in (route.prefill.address, route.decode.address)
        for _ in range(4):
            tokens, _ = mesh.generate(PROMPT, max_tokens=4)
            assert len(tokens) == 4
        assert _info(mesh, ROLES[role], twin.address).breaker_state == scheduler_pb2.BREAKER_STATE_CLOSED
        s = mesh.worker_stats(mesh.decodes[-1] if role == "decode" else mesh.decodes[0], "decode")
        assert s.num_free_blocks == s.num_total_blocks and s.num_handoffs == 0
    finally:
        mesh.close()
