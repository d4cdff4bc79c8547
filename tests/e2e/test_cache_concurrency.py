"""32 concurrent requests sharing a ~900-token system prompt through a mesh with the cache pool: every output
is HF's, the cache (or, when on, the decode worker's own prefix cache) reports the hits, and nothing half-written
is ever served."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import start_mesh
from kvmesh.v1 import cache_pb2, cache_pb2_grpc

NUM_REQUESTS = 32
SHARED = [(i * 29 + 5) % 1000 + 3 for i in range(900)]
MAX_TOKENS = 4


def prompts(offset: int) -> list[list[int]]:
    return [SHARED + [(offset + i * 7 + j) % 1000 + 3 for j in range(5 + i % 11)] for i in range(NUM_REQUESTS)]


def hf_reference(path, batch: list[list[int]]) -> list[list[int]]:
    """HF greedy tokens for each prompt."""
    model = AutoModelForCausalLM.from_pretrained(path)
    out = []
    with torch.no_grad():
        for ids in batch:
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
            out.append(tokens[0, len(ids):].tolist())
    return out


@pytest.mark.parametrize("decode_prefix_caching", [False, True], ids=["cache-service", "decode-pool"])
def test_concurrent_requests_sharing_a_system_prompt(model_dir, decode_prefix_caching):
    path = model_dir("llama")
    mesh = start_mesh(str(path), worker_args=("--max-num-batched-tokens", "4096"),
                      decode_prefix_caching=decode_prefix_caching, policy="kv_aware")
    try:
        stub = cache_pb2_grpc.CacheStub(mesh.channel(mesh.cache.address))

        def burst(batch):
            with ThreadPoolExecutor(NUM_REQUESTS) as pool:
                results = list(pool.map(lambda ids: mesh.generate(ids, MAX_TOKENS, ignore_eos=True), batch))
            return [got for got, _ in results], [r[-1].usage.cached_tokens for _, r in results]

        batch = prompts(0)
        cold, _ = burst(batch)  # all race: lookups and puts of the same blocks interleave
        # every full block is offered once the cold run ends: the shared ones, and the 57th of each prompt of at
        # least 912 tokens (its own). Wait for them all, so what the warm run can hit is known exactly.
        own = sum(len(ids) >= 912 for ids in batch)
        deadline = time.monotonic() + 15
        while stub.Stats(cache_pb2.StatsRequest(), timeout=5).puts < len(SHARED) // 16 + own:
            assert time.monotonic() < deadline, "the cold run's blocks never reached the cache"
            time.sleep(0.05)
        warm, cached = burst(batch)
        stats = stub.Stats(cache_pb2.StatsRequest(), timeout=5)
        assert cold == hf_reference(path, batch)
        assert warm == cold
        # the 56 whole blocks of the shared 900 tokens, and a prompt's own 57th block where a token follows it
        assert cached == [912 if len(ids) > 912 else 896 for ids in batch]
        assert stats.rejected_puts == 0 and stats.corrupt_blocks == 0
        if decode_prefix_caching:  # the decode worker served the shared prefix from its own pool
            decode = mesh.worker_stats(mesh.decodes[0], "decode")
            assert decode.prefix_hit_blocks >= NUM_REQUESTS * 56
        else:
            assert stats.hits >= NUM_REQUESTS * 56
            # the shared blocks are staged once and every other fetch of them sends that copy
            assert stats.staging_blocks_shared >= (NUM_REQUESTS - 1) * 56 and stats.staging_blocks_used == 0
        assert mesh.wait_blocks_free(5.0)
    finally:
        mesh.close()
