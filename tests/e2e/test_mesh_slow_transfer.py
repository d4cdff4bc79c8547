"""Leases that measure progress, not patience, through the whole mesh: a KV transfer slowed far past the
handoff lease, but moving, completes with the reference's greedy tokens; one that stops moving still fails with
DEADLINE_EXCEEDED, and every block, handoff and transfer on both workers is freed."""

import time

import grpc
import pytest

from mesh import start_mesh
from test_mesh_parity import hf_greedy
from kvmesh.v1 import common_pb2, gateway_pb2

LEASE_S = 2.5  # --handoff-lease-s: the handoff's and the transfer's lease, on both workers
LAYER_DELAY_S = 1.0  # chaos holds every layer back this long: far inside the lease, so the transfer keeps moving
NUM_LAYERS = 4  # the tiny model's
PROMPT = [5, 6, 7, 8, 9] * 7
MAX_TOKENS = 8


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_transfer_slower_than_the_lease_but_moving_completes_with_greedy_parity(model_dir, transport):
    path = model_dir("llama")
    mesh = start_mesh(str(path), transport=transport, chaos=f"delay={LAYER_DELAY_S}s",
                      worker_args=("--handoff-lease-s", str(LEASE_S)))
    try:
        started = time.monotonic()
        got, responses = mesh.generate(PROMPT, MAX_TOKENS, timeout=120, ignore_eos=True)
        seconds = time.monotonic() - started
        assert got == hf_greedy(path, PROMPT, MAX_TOKENS)
        # the chaos delays alone hold the transfer for NUM_LAYERS x LAYER_DELAY_S: well past one lease period
        assert seconds >= NUM_LAYERS * LAYER_DELAY_S > 1.5 * LEASE_S
        assert responses[-1].timings.kv_transfer_seconds >= (NUM_LAYERS - 1) * LAYER_DELAY_S > LEASE_S
        assert mesh.wait_blocks_free(10.0)
    finally:
        mesh.close()


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_transfer_that_stops_moving_fails_with_deadline_exceeded_and_frees_every_block(model_dir, transport):
    mesh = start_mesh(str(model_dir("llama")), transport=transport, chaos="stall=after:2",
                      worker_args=("--handoff-lease-s", str(LEASE_S)))
    try:
        request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPT,
                                              sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8))
        tokens = []
        with pytest.raises(grpc.RpcError) as failure:
            for response in mesh.gateway_stub().Generate(request, timeout=60):
                tokens += response.token_ids
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failure.value.details()
        assert tokens == []
        assert mesh.wait_blocks_free(15.0)  # decode and prefill: blocks, handoffs and transfers
    finally:
        mesh.close()
