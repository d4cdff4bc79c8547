"""The decode worker's own prefix cache, with real processes: a prompt sharing a long prefix with an earlier one
is routed (kv_aware) to the decode worker holding it, gets the same tokens as HF, reports the hit as cached
tokens, and has only its uncached blocks sent by the prefill worker (which pulls the prefix from that same pool
rather than compute it: peer pull); a short tail is prefilled on the decode
worker itself; and once every request is done, no block, handoff or transfer is left behind."""

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import start_mesh
from kvmesh.transports import available_backends
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

BLOCK = 16
TINY_BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 32 * 4  # K and V, 4 layers, 2 KV heads of 32, float32
MAX_TOKENS = 8
PREFIX = [(i * 29 + 5) % 1000 + 3 for i in range(6 * BLOCK)]


def hf_greedy(model, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


TRANSPORTS = [pytest.param(t, marks=[] if t in available_backends() else [pytest.mark.skip(reason=f"no {t} here")])
              for t in ("shm", "grpc", "ucx")]


@pytest.fixture(scope="module", params=TRANSPORTS)
def mesh(request, model_dir):
    # the cache service is turned off for the prefill worker, so every hit here is the decode worker's own
    mesh = start_mesh(str(model_dir("llama")), decode=2, transport=request.param, lease_s=3.0,
                      env={"KVMESH_SCHEDULER_POLICY": "kv_aware", "KVMESH_PREFILL_CACHE": "none"})
    yield mesh
    mesh.close()


def route(mesh, ids) -> scheduler_pb2.RouteResponse:
    stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
    return stub.Route(scheduler_pb2.RouteRequest(request_id="probe", prompt_token_ids=ids, dry_run=True), timeout=5)


def decode_stats(mesh):
    return {proc.address: mesh.worker_stats(proc, "decode") for proc in mesh.decodes}


def test_a_shared_prefix_is_routed_to_its_holder_and_only_the_rest_is_sent(mesh, model_dir):
    hf = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    first = PREFIX + [11, 12, 13, 14, 15]
    got, responses = mesh.generate(first, MAX_TOKENS, ignore_eos=True)
    assert got == hf_greedy(hf, first)
    cold = responses[-1]
    assert cold.usage.cached_tokens == 0 and cold.timings.decode_cached_tokens == 0
    assert cold.timings.kv_transfer_bytes == 7 * TINY_BLOCK_BYTES
    holder = next(a for a, s in decode_stats(mesh).items() if s.num_cached_blocks >= 6)
    second = PREFIX + [(i * 7 + 3) % 900 + 3 for i in range(BLOCK + 9)]  # a 25-token tail: prefilled remotely
    deadline = time.monotonic() + 10
    while route(mesh, second).num_decode_cached_tokens != 6 * BLOCK:  # the holder's KV events reach the scheduler
        assert time.monotonic() < deadline, "the scheduler never learnt what the decode worker holds"
        time.sleep(0.1)
    plan = route(mesh, second)
    assert plan.decode.address == holder
    assert plan.kv_source == "peer" and plan.kv_peer.address == holder  # the prefill worker pulls, not recomputes
    before = decode_stats(mesh)
    got, responses = mesh.generate(second, MAX_TOKENS, ignore_eos=True)
    assert got == hf_greedy(hf, second)
    warm = responses[-1]
    assert warm.usage.cached_tokens == 6 * BLOCK and warm.timings.decode_cached_tokens == 6 * BLOCK
    # prompt of 121 tokens = 8 blocks; 6 shared, so only 2 blocks moved
    assert warm.timings.kv_transfer_bytes == 2 * TINY_BLOCK_BYTES < cold.timings.kv_transfer_bytes
    after = decode_stats(mesh)
    # the 6 shared blocks served twice: to the request's own reservation, and to the prefill worker's pull
    assert after[holder].prefix_hit_blocks - before[holder].prefix_hit_blocks == 2 * 6
    assert mesh.wait_blocks_free(5.0)


def test_a_short_tail_is_prefilled_on_the_decode_worker(mesh, model_dir):
    hf = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    prompt = PREFIX + [21, 22, 23]  # every full block held, 3 tokens left: no prefill worker, no transfer
    deadline = time.monotonic() + 10
    while route(mesh, prompt).num_decode_cached_tokens != 6 * BLOCK:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    prefill_before = mesh.worker_stats(mesh.prefills[0], "prefill")
    got, responses = mesh.generate(prompt, MAX_TOKENS, ignore_eos=True)
    assert got == hf_greedy(hf, prompt)
    last = responses[-1]
    assert last.usage.cached_tokens == 6 * BLOCK and last.timings.kv_transfer_bytes == 0
    assert mesh.worker_stats(mesh.prefills[0], "prefill").num_free_blocks == prefill_before.num_free_blocks


def test_no_block_leaks_once_every_request_is_done(mesh):
    prompts = [PREFIX[:k] + [30 + k, 31, 32] for k in (0, BLOCK, 3 * BLOCK, 6 * BLOCK)]
    for ids in prompts:
        mesh.generate(ids, 4)
    assert mesh.wait_blocks_free(5.0)
    for stats in decode_stats(mesh).values():
        assert stats.num_free_blocks == stats.num_total_blocks  # free + cached-free
        assert stats.num_handoffs == 0 and stats.num_transfers == 0
        assert stats.num_cached_free_blocks == stats.num_cached_blocks  # nothing held, the prefixes kept
    assert sum(s.num_cached_blocks for s in decode_stats(mesh).values()) >= 6
