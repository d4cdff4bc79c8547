"""Peer pull: a decode worker's own pool as the source of a prompt's cached prefix. A first request leaves its
prompt's full blocks cached in one decode worker's pool; the second, which shares that prefix, is routed to the
other (round_robin), and the scheduler's plan sends the prefill worker to the first one for the prefix
(kv_source "peer"): the prefill worker fetches those blocks from it through the transports and computes only the
rest. Greedy output equals HF transformers' on every transport, the usage counts the fetched tokens as cached,
and every pinned block comes back. No cache service is used (the prefill worker runs with --cache none), so the
prefix could have come from nowhere else."""

import time

import pytest
from transformers import AutoTokenizer

from mesh import per_transport, start_mesh
from test_mesh_parity import hf_greedy
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

SHARED = ("A key value cache stores the keys and values of every token that attention has seen, so that the next "
          "token needs only its own. ") * 2


@pytest.mark.parametrize("transport", per_transport())
def test_a_prefill_worker_pulls_the_prefix_from_another_decode_workers_pool(model_dir, transport):
    transport, = transport
    path = model_dir("llama")
    mesh = start_mesh(str(path), decode=2, transport=transport, policy="round_robin",
                      prefill_args=("--cache", "none"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        first = tokenizer.encode(SHARED + "The first question is about the pool.")
        second = tokenizer.encode(SHARED + "And the second one, which goes elsewhere, asks about the transports.")
        shared_blocks = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b) // 16
        assert shared_blocks >= 2
        got, _ = mesh.generate(first, 8, ignore_eos=True)  # round_robin: the first decode worker registered
        assert got == hf_greedy(path, first, 8)
        cached = [mesh.worker_stats(d, "decode").num_cached_blocks for d in mesh.decodes]
        assert sorted(cached)[0] == 0 and max(cached) >= shared_blocks, cached
        holder, other = sorted(mesh.decodes, key=lambda d: -mesh.worker_stats(d, "decode").num_cached_blocks)
        stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
        deadline = time.monotonic() + 60
        while True:  # its KV events reach the scheduler with a heartbeat
            plan = stub.Route(scheduler_pb2.RouteRequest(request_id="probe", prompt_token_ids=second, dry_run=True),
                              timeout=5)
            if plan.kv_source == "peer":
                break
            assert time.monotonic() < deadline, f"the plan never pulled from a peer: {plan}"
            time.sleep(0.2)
        assert plan.decode.address == other.address and plan.kv_peer.address == holder.address
        assert plan.num_cached_tokens == shared_blocks * 16
        hits = mesh.worker_stats(holder, "decode").prefix_hit_blocks
        got, responses = mesh.generate(second, 8, ignore_eos=True)
        assert got == hf_greedy(path, second, 8)
        assert responses[-1].usage.cached_tokens == shared_blocks * 16  # fetched, not computed
        assert mesh.worker_stats(holder, "decode").prefix_hit_blocks - hits == shared_blocks  # the peer's pins
        assert mesh.wait_blocks_free(5.0)
    finally:
        mesh.close()
