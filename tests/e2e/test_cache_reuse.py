"""Prefix reuse through the KV cache pool, with real processes: a hit of any length, from DRAM or from SSD,
gives the same tokens as no hit (and as HF transformers); a warm SSD tier serves after a restart; a corrupt
block file is never served."""

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import start_mesh
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, gateway_pb2, scheduler_pb2, scheduler_pb2_grpc

BLOCK = 16
TINY_BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 32 * 4  # K and V, 4 layers, 2 KV heads of 32, float32
MAX_TOKENS = 8


def hf_greedy(model, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def cache_stats(mesh) -> cache_pb2.StatsResponse:
    return cache_pb2_grpc.CacheStub(mesh.channel(mesh.cache.address)).Stats(cache_pb2.StatsRequest(), timeout=5)


def tier(stats, name):
    return next(t for t in stats.tiers if t.name == name)


def wait_ssd_blocks(mesh, n: int, timeout_s: float = 10.0) -> None:
    """Offers reach the cache behind the request and the SSD behind the put: wait for them."""
    deadline = time.monotonic() + timeout_s
    while tier(cache_stats(mesh), "ssd").num_blocks < n:
        assert time.monotonic() < deadline, "the prompt's blocks never reached the SSD tier"
        time.sleep(0.05)


def until_cached(mesh, ids, expected: list[int], num_cached: int, timeout_s: float = 10.0) -> bool:
    """Run ids until the hit is num_cached tokens (every run's tokens must equal expected on the way)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got, cached = run(mesh, ids)
        assert got == expected and cached in (0, num_cached), cached
        if cached == num_cached:
            return True
        assert time.monotonic() < deadline, "the restarted cache never served its SSD tier"
        time.sleep(0.2)


def run(mesh, ids):
    got, responses = mesh.generate(ids, MAX_TOKENS, ignore_eos=True)
    return got, responses[-1].usage.cached_tokens


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def cache_mesh(request, model_dir, tmp_path_factory):
    path = model_dir(request.param)
    ssd = tmp_path_factory.mktemp(f"ssd-{request.param}")
    cache_args = ("--dram-bytes", str(4 * TINY_BLOCK_BYTES), "--ssd-dir", str(ssd))
    # the decode worker's own prefix cache would serve these repeats itself: off, so the cache service is tested
    mesh = start_mesh(str(path), transport="shm", cache_args=cache_args, decode_prefix_caching=False,
                      policy="kv_aware")
    yield request.param, path, mesh, ssd, cache_args
    mesh.close()


def test_hits_of_every_length_from_dram_and_ssd_give_the_same_tokens(cache_mesh):
    family, path, mesh, _, _ = cache_mesh
    hf = AutoModelForCausalLM.from_pretrained(path)
    prompt = [(i * 37 + 11) % 1000 + 3 for i in range(8 * BLOCK + 5)]
    cold, cached = run(mesh, prompt)
    assert cached == 0 and cold == hf_greedy(hf, prompt)
    wait_ssd_blocks(mesh, 8)
    warm, cached = run(mesh, prompt)
    assert (warm, cached) == (cold, 8 * BLOCK)  # 4 blocks from DRAM at most, the rest from SSD
    route = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address)).Route(
        scheduler_pb2.RouteRequest(request_id="probe", prompt_token_ids=prompt, dry_run=True), timeout=5)
    assert route.num_cached_tokens == 8 * BLOCK  # the scheduler's peek sees the same hit
    body = json.dumps({"model": str(path), "prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()
    http = urllib.request.Request(f"{mesh.http_base}/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(http, timeout=30) as reply:
        usage = json.loads(reply.read())["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 8 * BLOCK
    stats = cache_stats(mesh)
    assert tier(stats, "dram").hits > 0 and tier(stats, "ssd").hits > 0
    assert tier(stats, "dram").num_bytes <= 4 * TINY_BLOCK_BYTES
    for num_shared, expected_hit in ((3 * BLOCK + 7, 3), (8 * BLOCK, 7), (BLOCK + 1, 1), (BLOCK, 0)):
        ids = prompt[:num_shared] + [5, 6, 7][: 0 if num_shared % BLOCK == 0 else 3]
        got, cached = run(mesh, ids)
        assert cached == expected_hit * BLOCK, (family, num_shared)
        assert got == hf_greedy(hf, ids), (family, num_shared)
    assert mesh.wait_blocks_free(2.0)


def test_one_token_requests_and_eos_first_tokens_survive_the_prefill_handoff(cache_mesh):
    family, path, mesh, _, _ = cache_mesh
    hf = AutoModelForCausalLM.from_pretrained(path)
    prompt = [(i * 41 + 9) % 1000 + 3 for i in range(2 * BLOCK + 3)]
    got, responses = mesh.generate(prompt, 1)
    assert got == hf_greedy(hf, prompt, 1) and responses[-1].usage.completion_tokens == 1
    got, _ = mesh.generate(prompt, 3, stop_token_ids=[got[0]])  # the first token stops the request
    assert got == hf_greedy(hf, prompt, 1)


def test_tenants_with_different_cache_salts_never_share_blocks(cache_mesh):
    family, path, mesh, _, _ = cache_mesh
    prompt = [(i * 43 + 1) % 1000 + 3 for i in range(3 * BLOCK + 1)]

    def salted(salt: str) -> tuple[list[int], int]:
        params = common_pb2.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, cache_salt=salt, sampling=params)
        responses = list(mesh.gateway_stub().Generate(request, timeout=60))
        return [t for r in responses for t in r.token_ids], responses[-1].usage.cached_tokens

    a_cold, cached = salted("tenant-a")
    assert cached == 0
    deadline = time.monotonic() + 10
    while salted("tenant-a")[1] != 3 * BLOCK:  # tenant a's own blocks come back to it
        assert time.monotonic() < deadline
        time.sleep(0.1)
    b_cold, cached = salted("tenant-b")
    assert cached == 0 and b_cold == a_cold


def test_a_restarted_cache_serves_its_warm_ssd_tier_but_never_a_corrupt_block(cache_mesh):
    family, path, mesh, ssd, cache_args = cache_mesh
    if family != "llama":
        pytest.skip("restart once, on one family")
    hf = AutoModelForCausalLM.from_pretrained(path)
    prompt = [(i * 53 + 7) % 1000 + 3 for i in range(6 * BLOCK + 3)]
    held = tier(cache_stats(mesh), "ssd").num_blocks
    cold, _ = run(mesh, prompt)
    wait_ssd_blocks(mesh, held + 6)  # this prompt's 6 blocks are on disk
    mesh.cache.stop()
    assert run(mesh, prompt) == (cold, 0)  # no cache: computed in full, never failed
    # flip one byte of the data of the 3rd block of the earlier prompt: it ends that chain at two blocks
    files = {p.name: p for p in Path(ssd).iterdir()}
    assert len(files) >= held + 6
    scheduler = mesh.scheduler.address
    mesh.cache = mesh.procs.start("cache", "--scheduler", scheduler, *cache_args)
    assert until_cached(mesh, prompt, cold, 6 * BLOCK)  # once the prefill worker has found the new cache
    assert tier(cache_stats(mesh), "ssd").hits >= 6
    # corrupt a block of the first prompt on disk, then ask for it
    mesh.cache.stop()
    first = [(i * 37 + 11) % 1000 + 3 for i in range(8 * BLOCK + 5)]
    from kvmesh.services.kv_identity import full_block_hashes
    from kvmesh.services.engine.engine import LLMEngine
    layout = LLMEngine.from_path(path, num_blocks=4).layout
    third = full_block_hashes(layout, first)[2].hex()
    target = next(p for name, p in files.items() if third in name)
    raw = bytearray(target.read_bytes())
    raw[200] ^= 0x01
    target.write_bytes(bytes(raw))
    mesh.cache = mesh.procs.start("cache", "--scheduler", scheduler, *cache_args)
    # a miss on `first` would put good copies of its blocks in DRAM (served instead of the file): so first wait
    # until the prefill worker reaches the new cache, with the other prompt
    assert until_cached(mesh, prompt, cold, 6 * BLOCK)
    got, cached = run(mesh, first)
    assert got == hf_greedy(hf, first) and cached == 2 * BLOCK
    assert cache_stats(mesh).corrupt_blocks == 1
    # the prefill offered the blocks it recomputed: the chain heals, and the file holds good bytes again
    deadline = time.monotonic() + 10
    while run(mesh, first)[1] != 8 * BLOCK:
        assert time.monotonic() < deadline, "the recomputed blocks never made it back into the cache"
        time.sleep(0.1)
    assert target.read_bytes() != bytes(raw)
