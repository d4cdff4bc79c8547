"""Flexible workers (`kvmesh worker --role auto`) with real processes: two of them, one starting as prefill and one
as decode, serve HF's greedy tokens; flipped (SetWorkerRole) while streams run, both swap roles after draining —
every stream completes with HF's tokens, the registry lists the new roles, requests routed in the new roles get
HF's tokens too, and nothing leaks (every block free, no handoff or transfer alive, no shared-memory segment left
after a clean stop)."""

import glob
import threading
import time

import pytest
from transformers import AutoModelForCausalLM

from mesh import start_mesh
from reference import hf_greedy
from kvmesh.v1 import common_pb2, gateway_pb2, scheduler_pb2, scheduler_pb2_grpc

P, D = scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE
LONG = 200  # tokens each stream asks for
PROMPTS = [[(i * 31 + j * 7) % 900 + 3 for j in range(20 + 5 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def mesh(model_dir):
    m = start_mesh(str(model_dir("llama")), prefill=1, decode=1, flexible=True)
    yield m
    m.close()


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir("llama"))


class Stream(threading.Thread):
    """One greedy gRPC stream through the gateway, read on its own thread."""

    def __init__(self, mesh, prompt: list[int]):
        super().__init__(daemon=True)
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=LONG, ignore_eos=True)
        self.call = mesh.gateway_stub().Generate(
            gateway_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling), timeout=180)
        self.prompt, self.tokens, self.error = prompt, [], None
        self.started = threading.Event()
        self.start()

    def run(self):
        try:
            for response in self.call:
                self.tokens.extend(response.token_ids)
                self.started.set()
        except Exception as e:  # noqa: BLE001 — the test asserts there is none
            self.error = e
        self.started.set()


def roles(mesh) -> dict[str, tuple[int, bool, int]]:
    """address -> (role, flexible, desired role) as the scheduler lists its workers."""
    return {w.address: (w.role, w.flexible, w.desired_role) for w in mesh.workers(scheduler_pb2.WORKER_ROLE_UNSPECIFIED)
            if w.role in (P, D)}


def set_role(mesh, address: str, role: int) -> bool:
    stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
    request = scheduler_pb2.SetWorkerRoleRequest(address=address, role=role, reason="test")
    return stub.SetWorkerRole(request, timeout=5).accepted


def test_flexible_workers_register_as_their_initial_roles_and_serve_hf_tokens(mesh, hf):
    first, second = mesh.prefills[0].address, mesh.decodes[0].address
    assert roles(mesh) == {first: (P, True, 0), second: (D, True, 0)}
    for prompt in PROMPTS:
        got, _ = mesh.generate(prompt, max_tokens=12, ignore_eos=True)
        assert got == hf_greedy(hf, prompt, 12)
    assert mesh.wait_blocks_free(30)


def test_flipping_both_roles_while_streams_run_loses_no_request(mesh, hf):
    first, second = mesh.prefills[0], mesh.decodes[0]  # prefill then decode at start
    streams = [Stream(mesh, prompt) for prompt in PROMPTS]
    for stream in streams:  # every stream routed (and past its prefill) before the flip
        assert stream.started.wait(120) and stream.error is None, stream.error
    assert set_role(mesh, first.address, D) and set_role(mesh, second.address, P)
    assert not set_role(mesh, "127.0.0.1:1", P)  # no worker there
    for stream in streams:
        stream.join(180)
        assert not stream.is_alive()
        assert stream.error is None, stream.error
        assert stream.tokens == hf_greedy(hf, stream.prompt, LONG)  # nothing lost, repeated or changed
    deadline = time.monotonic() + 60
    while roles(mesh) != {first.address: (D, True, 0), second.address: (P, True, 0)}:
        assert time.monotonic() < deadline, f"the roles did not swap within 60 s: {roles(mesh)}"
        time.sleep(0.1)
    assert "role flip prefill -> decode done" in first.stderr
    assert "role flip decode -> prefill done" in second.stderr
    for prompt in PROMPTS:  # routed in the new roles: the old decode worker prefills for the old prefill worker
        got, _ = mesh.generate(prompt, max_tokens=12, ignore_eos=True)
        assert got == hf_greedy(hf, prompt, 12)
    assert mesh.wait_blocks_free(30)


def test_flexible_workers_stop_cleanly_and_leave_no_shared_memory(mesh):
    for proc in mesh.prefills + mesh.decodes:
        pid = proc.proc.pid
        proc.stop(30)
        assert glob.glob(f"/dev/shm/kvmesh-{pid}-*") == []
