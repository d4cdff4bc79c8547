"""A worker restarted on the same host:port is a new incarnation: the first request after it registers again
succeeds, on every transport, with the same greedy tokens — no peer uses a channel, shared-memory mapping or
transport agent of the process that died."""

from __future__ import annotations

import time

import pytest

from mesh import START_TIMEOUT_S, start_mesh
from kvmesh.transports import available_backends
from kvmesh.v1 import scheduler_pb2

PROMPT = list(range(5, 45))
ROLES = {"prefill": scheduler_pb2.WORKER_ROLE_PREFILL, "decode": scheduler_pb2.WORKER_ROLE_DECODE}


def _params():
    for transport in ("grpc", "shm", "ucx"):
        marks = []
        if transport not in available_backends():
            marks.append(pytest.mark.skip(reason=f"{transport} backend unavailable here (install kvmesh[ucx])"))
        for role in ROLES:
            yield pytest.param(transport, role, id=f"{transport}-{role}", marks=marks)


def _instance(mesh, role: str, address: str) -> str | None:
    return next((w.instance_id for w in mesh.workers(ROLES[role]) if w.address == address), None)


@pytest.mark.parametrize(("transport", "role"), list(_params()))
def test_first_request_after_a_restart_on_the_same_port_succeeds(model_dir, transport, role):
    mesh = start_mesh(str(model_dir("llama")), transport=transport, lease_s=2.0)
    try:
        reference, _ = mesh.generate(PROMPT, max_tokens=8)
        victim = (mesh.prefills if role == "prefill" else mesh.decodes)[0]
        address, old_instance = victim.address, _instance(mesh, role, victim.address)
        assert old_instance

        victim.kill()  # SIGKILL: no deregistration, no cleanup of its own
        reborn = mesh.procs.launch(role, *victim.args[victim.args.index("--port") + 2:], env=victim.env,
                                   port=victim.port)
        (mesh.prefills if role == "prefill" else mesh.decodes)[0] = reborn
        reborn.wait_serving(START_TIMEOUT_S)
        assert reborn.address == address
        if role == "decode":  # it moved a real block through its transport before it said SERVING
            assert f"transports ready: {transport}" in reborn.stderr, reborn.stderr[-2000:]
        deadline = time.monotonic() + 30
        while _instance(mesh, role, address) in (None, old_instance):
            assert time.monotonic() < deadline, f"the restarted {role} worker did not register again"
            time.sleep(0.05)

        first, _ = mesh.generate(PROMPT, max_tokens=8)  # the first request after the restart: no retry here
        assert first == reference
        assert len(mesh.generate(PROMPT[::-1], max_tokens=8)[0]) == 8
        assert mesh.wait_blocks_free(10), "a KV block was left taken after the restart"
    finally:
        mesh.close()
