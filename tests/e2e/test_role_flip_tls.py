"""Flexible workers under mTLS, with real processes: two `kvmesh worker --role auto --tls-dir DIR` present the
`worker` certificate, register (one as prefill, one as decode) and serve HF's greedy tokens over mTLS KV transfers;
`kvmesh role --tls-dir DIR` (the admin certificate) flips both, after which requests in the new roles still get HF's
tokens. What the fixed-role certificates may do is unchanged: a decode certificate cannot register as prefill, and
neither a worker nor a plaintext caller may ask for a flip."""

import os
import subprocess
import sys
import time

import grpc
import pytest
from transformers import AutoModelForCausalLM

from mesh import make_certs, start_mesh
from test_role_flip import hf_greedy, roles
from kvmesh.services.common import tls
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

P, D = scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE
PROMPTS = [[(i * 37 + j * 11) % 900 + 3 for j in range(18 + 7 * i)] for i in range(3)]


@pytest.fixture(scope="module")
def mesh(model_dir, tmp_path_factory):
    folder = make_certs(tmp_path_factory.mktemp("certs"))
    m = start_mesh(str(model_dir("llama")), prefill=1, decode=1, flexible=True, transport="grpc", tls_dir=folder)
    yield m
    m.close()


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir("llama"))


def kvmesh_role(mesh, address: str, role: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVMESH_TLS_DIR": ""}  # only what the flags say
    return subprocess.run([sys.executable, "-m", "kvmesh.services.cli", "role", "--scheduler",
                           mesh.scheduler.address, *flags, address, role], capture_output=True, text=True,
                          timeout=60, env=env)


def _scheduler_as(mesh, role: str) -> grpc.Channel:
    return tls.open_channel(mesh.scheduler.address, aio=False, identity=tls.load(mesh.tls_dir, role))


def assert_hf_tokens(mesh, hf) -> None:
    for prompt in PROMPTS:
        got, _ = mesh.generate(prompt, max_tokens=10, ignore_eos=True)
        assert got == hf_greedy(hf, prompt, 10)


def test_flexible_workers_with_the_worker_certificate_serve_hf_tokens(mesh, hf):
    first, second = mesh.prefills[0].address, mesh.decodes[0].address
    assert roles(mesh) == {first: (P, True, 0), second: (D, True, 0)}
    assert_hf_tokens(mesh, hf)
    assert mesh.wait_blocks_free(30)


def test_only_the_admin_certificate_may_flip_a_worker(mesh):
    first = mesh.prefills[0].address
    plain = kvmesh_role(mesh, first, "decode")  # no certificate: the handshake fails
    assert plain.returncode == 2 and "UNAVAILABLE" in plain.stderr
    with _scheduler_as(mesh, "worker") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            scheduler_pb2_grpc.SchedulerStub(channel).SetWorkerRole(
                scheduler_pb2.SetWorkerRoleRequest(address=first, role=D, reason="test"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "SetWorkerRole is not allowed for role 'worker'" in caught.value.details()
    assert roles(mesh)[first] == (P, True, 0)  # nothing asked of the worker


def test_kvmesh_role_with_the_tls_dir_flips_both_workers_and_they_serve_hf_tokens(mesh, hf):
    first, second = mesh.prefills[0], mesh.decodes[0]
    for address, role in ((first.address, "decode"), (second.address, "prefill")):
        done = kvmesh_role(mesh, address, role, "--tls-dir", mesh.tls_dir)
        assert done.returncode == 0, done.stderr
        assert f"flip to {role} pending" in done.stdout
    deadline = time.monotonic() + 60
    while roles(mesh) != {first.address: (D, True, 0), second.address: (P, True, 0)}:
        assert time.monotonic() < deadline, f"the roles did not swap within 60 s: {roles(mesh)}"
        time.sleep(0.1)
    assert "role flip prefill -> decode done" in first.stderr
    assert "role flip decode -> prefill done" in second.stderr
    assert_hf_tokens(mesh, hf)  # the old decode worker prefills for the old prefill worker, over mTLS
    assert mesh.wait_blocks_free(30)


@pytest.mark.parametrize(("cert", "as_role", "why"), [
    ("decode", P, "a decode certificate may not Register as WORKER_ROLE_PREFILL"),
    ("prefill", D, "a prefill certificate may not Register as WORKER_ROLE_DECODE"),
    ("worker", scheduler_pb2.WORKER_ROLE_CACHE, "a worker certificate may not Register as WORKER_ROLE_CACHE"),
])
def test_a_certificate_cannot_register_in_a_role_it_does_not_name(mesh, cert, as_role, why):
    before = roles(mesh)
    with _scheduler_as(mesh, cert) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Register(scheduler_pb2.RegisterRequest(role=as_role, address="127.0.0.1:1", flexible=True),
                          timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert why in caught.value.details()
    assert roles(mesh) == before  # no impostor joined


def test_a_worker_certificate_passes_the_role_check_as_prefill_or_decode(mesh):
    with _scheduler_as(mesh, "worker") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for role in (P, D):  # past the role check, the scheduler's own validation answers (no address)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Register(scheduler_pb2.RegisterRequest(role=role, address="", flexible=True), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_flexible_worker_without_the_worker_certificate_is_one_line_and_exit_2(procs, model_dir, tmp_path):
    folder = make_certs(tmp_path / "certs")
    os.unlink(os.path.join(folder, "worker.pem"))  # a folder made before flexible workers had a certificate
    proc = procs.launch("worker", "--role", "auto", "--model", str(model_dir("llama")), "--tls-dir", folder,
                        env={"KVMESH_TLS_DIR": ""})
    assert proc.wait(60) == 2
    lines = proc.stderr.strip().splitlines()
    assert lines and "missing" in lines[-1] and "worker.pem" in lines[-1] and "kvmesh certs" in lines[-1]
