"""Admission by KV blocks: a burst whose requests (prompt + max_tokens each) need more blocks than the decode
worker's pool holds is cut at the scheduler — the excess refused at once with RESOURCE_EXHAUSTED / 429 and a
retry-after, none left waiting on the decode worker for blocks — and every admitted request completes with HF's
tokens, its blocks freed.

The prefill worker is stopped (SIGSTOP) while the burst is routed, so the admitted requests hold their claims for
certain (none can finish and make room meanwhile): which requests fit is then decided by blocks alone."""

import concurrent.futures
import os
import signal
import time

import grpc
import httpx

from mesh import start_mesh
from test_mesh_parity import hf_greedy

BLOCK_BYTES = 2 * 4 * 2 * 32 * 16 * 4  # the tiny preset's KV block: K and V, 4 layers, 2 heads of 32, 16 tokens, fp32
NUM_BLOCKS = 24
PROMPT_TOKENS = 24
MAX_TOKENS = 120  # 144 tokens: 9 blocks of 16, so two requests fit the pool of 24 and a third does not
BURST = 6


def generate(mesh, prompt):
    try:
        return mesh.generate(prompt, MAX_TOKENS, timeout=120, ignore_eos=True)[0]
    except grpc.RpcError as e:
        return e


def test_a_burst_over_the_decode_pool_is_refused_by_the_scheduler_and_the_rest_completes(model_dir):
    path = model_dir("llama")
    mesh = start_mesh(str(path), lease_s=10.0,
                      worker_args=("--kv-cache-bytes", str(NUM_BLOCKS * BLOCK_BYTES), "--handoff-lease-s", "60"))
    prefill = mesh.prefills[0].proc
    try:
        assert mesh.worker_stats(mesh.decodes[0], "decode").num_total_blocks == NUM_BLOCKS
        prompts = [[(i * 31 + j * 7) % 1000 + 3 for j in range(PROMPT_TOKENS)] for i in range(BURST)]
        with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
            os.kill(prefill.pid, signal.SIGSTOP)
            try:
                futures = [pool.submit(generate, mesh, p) for p in prompts]
                deadline = time.monotonic() + 60
                while sum(f.done() for f in futures) < BURST - 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                refused = [f.result() for f in futures if f.done()]
                http = httpx.post(f"{mesh.http_base}/completions", timeout=60,
                                  json={"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True})
            finally:
                os.kill(prefill.pid, signal.SIGCONT)
        results = [f.result() for f in futures]
        assert len(refused) == BURST - 2, f"{len(refused)} of {BURST} ended while the pool was full"
        for e in refused:  # refused by the scheduler's admission, not after a wait on the decode worker
            assert isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            assert "room for the request's 9 KV blocks" in e.details(), e.details()
            assert dict(e.trailing_metadata()).get("retry-after", "").isdigit()
        assert http.status_code == 429, http.text
        assert "KV blocks" in http.json()["error"]["message"] and http.headers["Retry-After"].isdigit()
        admitted = [(p, r) for p, r in zip(prompts, results) if not isinstance(r, grpc.RpcError)]
        assert len(admitted) == 2, [r for r in results if isinstance(r, grpc.RpcError)]
        for prompt, tokens in admitted:
            assert tokens == hf_greedy(path, prompt, MAX_TOKENS)
        assert mesh.wait_blocks_free(15)
        assert "no free KV blocks" not in mesh.decodes[0].stderr
    finally:
        mesh.close()
