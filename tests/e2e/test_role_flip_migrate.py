"""A flexible decode worker flipped to prefill with `--flip-migrate-after-s` hands its running streams on rather
than waiting for them: the gateway migrates each to the other decode worker, and every stream still ends with
HF's greedy tokens, none lost or repeated; the worker then serves as a prefill worker and nothing leaks."""

import time

import pytest
from transformers import AutoModelForCausalLM

from mesh import start_mesh
from test_role_flip import LONG, PROMPTS, Stream, hf_greedy, roles, set_role
from kvmesh.v1 import scheduler_pb2

P, D = scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE


@pytest.fixture(scope="module")
def mesh(model_dir):
    m = start_mesh(str(model_dir("llama")), prefill=1, decode=2, flexible=True,
                   worker_args=("--flip-migrate-after-s", "0.01"))
    yield m
    m.close()


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir("llama"))


def busiest_decode(mesh, timeout_s: float = 60.0):
    """The decode worker with the most streams decoding now, once one has any."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = {p: mesh.worker_stats(p, "decode").num_running for p in mesh.decodes}
        busiest = max(running, key=running.get)
        if running[busiest] > 0:
            return busiest
        assert time.monotonic() < deadline, "no decode worker ever had a stream decoding"
        time.sleep(0.02)


def test_a_decode_worker_flipped_to_prefill_hands_its_streams_on(mesh, hf):
    streams = [Stream(mesh, prompt) for prompt in PROMPTS]
    victim = busiest_decode(mesh)
    other = next(p for p in mesh.decodes if p is not victim)
    assert set_role(mesh, victim.address, P)
    for stream in streams:
        stream.join(180)
        assert not stream.is_alive()
        assert stream.error is None, stream.error
        assert stream.tokens == hf_greedy(hf, stream.prompt, LONG)
    want = {mesh.prefills[0].address: (P, True, 0), victim.address: (P, True, 0), other.address: (D, True, 0)}
    deadline = time.monotonic() + 60
    while roles(mesh) != want:
        assert time.monotonic() < deadline, f"the flip did not complete within 60 s: {roles(mesh)}"
        time.sleep(0.1)
    assert "role flip decode -> prefill done" in victim.stderr
    for prompt in PROMPTS:  # two prefill workers now, one decode worker
        got, _ = mesh.generate(prompt, max_tokens=12, ignore_eos=True)
        assert got == hf_greedy(hf, prompt, 12)
    assert mesh.wait_blocks_free(30)
