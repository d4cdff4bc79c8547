"""Circuit breakers with real processes: a worker SIGKILLed with its lease still running is out of routing as
soon as the first call to it fails and is reported; the request that met it is retried on its twin (the client sees
no error), and the requests that follow go to the twin at once."""

import os
import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh import start_mesh
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

ROLES = {"prefill": scheduler_pb2.WORKER_ROLE_PREFILL, "decode": scheduler_pb2.WORKER_ROLE_DECODE}
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


def _retries(mesh) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.http_port}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "kvmesh:request_retries_total")


def _info(mesh, role: int, address: str) -> scheduler_pb2.WorkerInfo | None:
    return next((w for w in mesh.workers(role) if w.address == address), None)


def _meet_the_dead_one(mesh, role: int, victim) -> scheduler_pb2.WorkerInfo:
    """Send requests one at a time until one meets the dead worker (routes spread over both workers, so one soon
    does) and its breaker opens; every request succeeds, the one that met it retried elsewhere. The victim's info."""
    for _ in range(8):
        tokens, _ = mesh.generate(PROMPT, max_tokens=4)
        assert len(tokens) == 4
        info = _info(mesh, role, victim.address)
        if info.num_breaker_failures or info.breaker_state != scheduler_pb2.BREAKER_STATE_CLOSED:
            break
    deadline = time.monotonic() + 10  # generous for a loaded machine; the lease (60 s) is far off
    while (info := _info(mesh, role, victim.address)).breaker_state != scheduler_pb2.BREAKER_STATE_OPEN:
        assert time.monotonic() < deadline, f"breaker of the killed worker never opened: {info}"
        time.sleep(0.02)
    return info


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_killed_worker_is_out_of_routing_after_its_first_failed_call(model_dir, role):
    # A lease far longer than the test: the worker stays registered, so only its breaker can keep routes away.
    mesh = start_mesh(str(model_dir("llama")), prefill=2 if role == "prefill" else 1,
                      decode=2 if role == "decode" else 1, lease_s=60.0)
    try:
        victim, twin = (mesh.prefills if role == "prefill" else mesh.decodes)
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        retries = _retries(mesh)
        info = _meet_the_dead_one(mesh, ROLES[role], victim)
        assert _retries(mesh) >= retries + 1  # the request that met it, placed again on the twin
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
