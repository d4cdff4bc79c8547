"""A request waiting on the decode worker for free KV blocks is refused once what was left of the client's
time-to-first-token objective runs out — RESOURCE_EXHAUSTED with a retry-after, naming the objective — rather
than served late (and without an objective it waits the worker's --queue-timeout-s). The calls go to the decode
worker directly, as the gateway makes them: the scheduler's admission, which would refuse the second request up
front, is not in the way. Nothing leaks: the refused request takes no block, and the one holding the pool
completes with HF's tokens once its prefill worker runs again."""

import os
import signal
import threading
import time

import grpc

from mesh import start_mesh
from test_mesh_parity import hf_greedy
from kvmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc

BLOCK_BYTES = 2 * 4 * 2 * 32 * 16 * 4  # the tiny preset's KV block: K and V, 4 layers, 2 heads of 32, 16 tokens, fp32
NUM_BLOCKS = 24
HOLDER_TOKENS = 20 * 16  # the holder's prompt alone takes 20 of the 24 blocks
WAITER_TOKENS = 8 * 16


def decode_request(mesh, request_id, ids, max_tokens, budget_s=0.0):
    prefill = mesh.prefills[0]
    return decode_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=ids, ttft_budget_seconds=budget_s,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        prefill=decode_pb2.PeerRef(address=prefill.address, block_size=16), local_prefill=False)


def test_a_request_waiting_for_blocks_past_its_ttft_objective_is_refused_not_late(model_dir):
    path = model_dir("llama")
    mesh = start_mesh(str(path), lease_s=10.0,
                      worker_args=("--kv-cache-bytes", str(NUM_BLOCKS * BLOCK_BYTES), "--handoff-lease-s", "60"))
    stub = decode_pb2_grpc.DecodeStub(mesh.channel(mesh.decodes[0].address))
    holder_ids = [(j * 7) % 1000 + 3 for j in range(HOLDER_TOKENS)]
    waiter_ids = [(j * 11) % 1000 + 5 for j in range(WAITER_TOKENS)]
    prefill = mesh.prefills[0].proc
    held = {}
    try:
        os.kill(prefill.pid, signal.SIGSTOP)  # the holder's blocks stay reserved while its prefill cannot run
        try:
            def hold():
                held["tokens"] = [t for r in stub.Generate(decode_request(mesh, "holder", holder_ids, 8), timeout=300)
                                  for t in r.token_ids]

            holder = threading.Thread(target=hold)
            holder.start()
            deadline = time.monotonic() + 60
            while mesh.worker_stats(mesh.decodes[0], "decode").num_free_blocks > NUM_BLOCKS - 20:
                assert time.monotonic() < deadline, "the holder never reserved its blocks"
                time.sleep(0.05)
            try:
                list(stub.Generate(decode_request(mesh, "waiter", waiter_ids, 4, budget_s=1.0), timeout=120))
                raise AssertionError("the waiter was served although no block was free")
            except grpc.RpcError as e:
                refused = e
        finally:
            os.kill(prefill.pid, signal.SIGCONT)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "time-to-first-token objective" in refused.details(), refused.details()
        assert dict(refused.trailing_metadata()).get("retry-after", "").isdigit()
        holder.join(120)
        assert held.get("tokens") == hf_greedy(path, holder_ids, 8)
        assert mesh.wait_blocks_free(5.0)
    finally:
        mesh.close()
