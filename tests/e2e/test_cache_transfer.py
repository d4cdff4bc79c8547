"""Cache hits delivered through the KV transports, with real processes: the cache writes a prompt's cached blocks
straight into the prefill worker's reserved blocks (shm on this host, grpc when forced), the answer equals the cold
one, and the spans say how; a damaged delivery, a stalled cache, a cache killed mid-fetch and a client that cancels
mid-fetch are misses (or a cancel) that leave no staging block, transfer record or shared-memory segment behind.
The decode workers' own prefix cache is off here: it would serve the repeated prompts itself."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import start_mesh
from kvmesh.services.common import conventions as names
from kvmesh.services.trace.spans import read_jsonl
from kvmesh.transports.shm import list_segments
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, gateway_pb2

BLOCK = 16
TINY_BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 32 * 4  # K and V, 4 layers, 2 KV heads of 32, float32
MAX_TOKENS = 8


def make_prompt(seed: int, num_blocks: int) -> list[int]:
    return [(i * seed + 11) % 1000 + 3 for i in range(num_blocks * BLOCK + 3)]


def cache_stats(mesh) -> cache_pb2.StatsResponse:
    return cache_pb2_grpc.CacheStub(mesh.channel(mesh.cache.address)).Stats(cache_pb2.StatsRequest(), timeout=5)


def request(ids, request_id: str = "") -> gateway_pb2.GenerateRequest:
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return gateway_pb2.GenerateRequest(prompt_token_ids=ids, request_id=request_id, sampling=params)


def run(mesh, ids, request_id: str = "") -> tuple[list[int], int]:
    responses = list(mesh.gateway_stub().Generate(request(ids, request_id), timeout=60))
    return [t for r in responses for t in r.token_ids], responses[-1].usage.cached_tokens


def hf_greedy(path, ids) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def wait_cached(mesh, num_blocks: int, timeout_s: float = 10.0) -> None:
    """Offers reach the cache behind the request: wait until it holds this many blocks."""
    deadline = time.monotonic() + timeout_s
    while cache_stats(mesh).num_blocks < num_blocks:
        assert time.monotonic() < deadline, "the prompt's blocks never reached the cache"
        time.sleep(0.05)


def mesh_segments(mesh) -> dict[str, int]:
    """Shared-memory segments per live service of the mesh (named after their owner's pid)."""
    pids = {p.proc.pid: p.service for p in [*mesh.prefills, *mesh.decodes, mesh.cache] if p.proc.poll() is None}
    counts = {service: 0 for service in pids.values()}
    for name in list_segments():
        service = pids.get(int(name.split("-")[1]))
        if service is not None:
            counts[service] += 1
    return counts


def assert_no_leaks(mesh, shm: bool, cache_alive: bool = True, timeout_s: float = 10.0) -> None:
    """Every worker's blocks free with no handoff or transfer left; the cache holds no staging block or open
    transfer; each worker has exactly its pool's segment (shm) or none, and a sender (the prefill worker, the cache)
    at most one more: the staging slots of its small shm transfers (transports/shm/staging.py), made once, not per
    request."""
    assert mesh.wait_blocks_free(timeout_s)
    deadline = time.monotonic() + timeout_s
    while cache_alive:
        stats = cache_stats(mesh)
        if (stats.staging_blocks_used, stats.open_transfers) == (0, 0):
            break
        assert time.monotonic() < deadline, (stats.staging_blocks_used, stats.open_transfers)
        time.sleep(0.05)
    found = mesh_segments(mesh)
    staging = {service: n - int(shm and service != "cache") for service, n in found.items()}
    assert staging["decode"] == 0 and all(0 <= n <= int(shm) for n in staging.values()), found
    assert set(found) == {"prefill", "decode", *(["cache"] if cache_alive else [])}


def spans_of(path, request_id: str, timeout_s: float = 10.0):
    """The spans of the trace whose root carries request_id, once the cache's delivery spans are in the file."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = read_jsonl(path) if path.exists() else []
        roots = [s for s in spans if s.name == names.REQUEST_SPAN
                 and s.attributes.get(names.ATTR_REQUEST_ID) == request_id]
        trace = [s for s in spans if roots and s.trace_id == roots[0].trace_id]
        if {(s.service, s.name) for s in trace} >= {("kvmesh-cache", names.CACHE_GET),
                                                    ("kvmesh-prefill", names.CACHE_GET),
                                                    ("kvmesh-cache", names.KV_TRANSFER)}:
            return trace
        assert time.monotonic() < deadline, f"no cache delivery spans in the trace of {request_id}"
        time.sleep(0.1)


@pytest.fixture(scope="module", params=[("auto", "shm"), ("grpc", "grpc")], ids=["shm", "grpc-forced"])
def traced_mesh(request, model_dir, tmp_path_factory):
    transport, backend = request.param
    path = tmp_path_factory.mktemp("cache-transfer") / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(path), "OTEL_BSP_SCHEDULE_DELAY": "50"}
    model = model_dir("llama")
    mesh = start_mesh(str(model), transport=transport, env=env, decode_prefix_caching=False, policy="kv_aware")
    yield mesh, model, backend, path
    mesh.close()


def test_a_hit_lands_in_the_prefill_workers_blocks_through_the_transport(traced_mesh):
    mesh, model, backend, path = traced_mesh
    prompt = make_prompt(37, 5)
    cold, cached = run(mesh, prompt)
    assert cached == 0 and cold == hf_greedy(model, prompt)
    wait_cached(mesh, 5)
    request_id = f"warm-{uuid.uuid4().hex[:8]}"
    warm, cached = run(mesh, prompt, request_id)
    assert (warm, cached) == (cold, 5 * BLOCK)
    stats = cache_stats(mesh)
    assert stats.deliveries >= 1 and stats.failed_deliveries == 0
    trace = spans_of(path, request_id)
    for service in ("kvmesh-cache", "kvmesh-prefill"):
        get = next(s for s in trace if s.service == service and s.name == names.CACHE_GET)
        assert get.attributes[names.ATTR_CACHE_HIT_BLOCKS] == 5
        assert get.attributes[names.ATTR_KV_BACKEND] == backend
        assert get.attributes[names.ATTR_KV_BYTES] == 5 * TINY_BLOCK_BYTES
        assert get.attributes[names.ATTR_CACHE_TIER] == "dram"
    sent = next(s for s in trace if s.service == "kvmesh-cache" and s.name == names.KV_TRANSFER)
    assert sent.attributes["kv.backend"] == backend and sent.attributes["kv.bytes"] == 5 * TINY_BLOCK_BYTES
    assert_no_leaks(mesh, shm=backend == "shm")


def test_a_corrupted_delivery_is_caught_and_the_prompt_computed(model_dir):
    model = model_dir("llama")
    mesh = start_mesh(str(model), cache_args=("--transport-chaos", "corrupt=1"), decode_prefix_caching=False,
                      policy="kv_aware")
    try:
        prompt = make_prompt(41, 4)
        cold, _ = run(mesh, prompt)
        wait_cached(mesh, 4)
        for _ in range(2):
            assert run(mesh, prompt) == (cold, 0)  # the checksums caught it: computed in full, never failed
        stats = cache_stats(mesh)
        assert stats.failed_deliveries >= 2 and stats.deliveries == 0 and stats.hits >= 8
        assert cold == hf_greedy(model, prompt)
        assert_no_leaks(mesh, shm=True)
    finally:
        mesh.close()


def test_a_stalled_cache_is_a_miss_within_the_fetch_deadline(model_dir):
    model = model_dir("llama")
    mesh = start_mesh(str(model), cache_args=("--transport-chaos", "stall=after:1"), decode_prefix_caching=False,
                      policy="kv_aware")
    try:
        prompt = make_prompt(53, 3)
        cold, _ = run(mesh, prompt)
        wait_cached(mesh, 3)
        start = time.monotonic()
        assert run(mesh, prompt) == (cold, 0)
        assert time.monotonic() - start < 2.0 + 3.0  # the fetch deadline (--cache-timeout-s 2), then computed
        assert_no_leaks(mesh, shm=True)
        assert cache_stats(mesh).failed_deliveries == 1
    finally:
        mesh.close()


@pytest.fixture(scope="module")
def slow_mesh(model_dir):
    """A mesh whose cache writes each layer of a delivery 150 ms late, so a test can act mid-fetch."""
    mesh = start_mesh(str(model_dir("llama")), cache_args=("--transport-chaos", "delay=150ms"),
                      decode_prefix_caching=False, policy="kv_aware")
    yield mesh
    mesh.close()


def wait_fetching(mesh, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while cache_stats(mesh).open_transfers == 0:
        assert time.monotonic() < deadline, "no delivery started"
        time.sleep(0.01)


def test_a_client_cancelling_mid_fetch_frees_staging_transfers_and_blocks(slow_mesh):
    mesh = slow_mesh
    prompt = make_prompt(43, 4)
    cold, _ = run(mesh, prompt)
    wait_cached(mesh, 4)
    call = mesh.gateway_stub().Generate(request(prompt), timeout=60)

    def drain():
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    drained = threading.Thread(target=drain, daemon=True)
    drained.start()
    wait_fetching(mesh)
    call.cancel()
    drained.join(10)
    assert call.code() == grpc.StatusCode.CANCELLED
    assert_no_leaks(mesh, shm=True)
    stats = cache_stats(mesh)
    assert stats.failed_deliveries >= 1
    assert run(mesh, prompt) == (cold, 4 * BLOCK)  # the next one is served, slowly, from the cache


def test_a_cache_killed_mid_fetch_is_a_miss_and_leaks_nothing(slow_mesh):
    mesh = slow_mesh
    prompt = make_prompt(47, 3)
    cold, _ = run(mesh, prompt)
    wait_cached(mesh, 3 + 4)  # the previous test's 4 blocks are held too
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=run(mesh, prompt)), daemon=True)
    worker.start()
    wait_fetching(mesh)
    mesh.cache.kill()
    worker.join(30)
    assert result["out"] == (cold, 0)
    assert_no_leaks(mesh, shm=True, cache_alive=False)
