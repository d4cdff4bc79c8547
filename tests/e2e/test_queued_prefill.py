"""A loaded prefill worker makes requests slower, never failed: prompts queued behind each other on one prefill
worker for many handoff leases (nothing of their own KV moves meanwhile) stay alive on both workers, because a
stepping engine renews the leases of what waits in it, and complete with HF's greedy tokens — no lapse, and no
retry hiding one."""

import concurrent.futures

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh import start_mesh
from test_mesh_parity import hf_greedy

LEASE_S = 3.0  # --handoff-lease-s on both workers
NUM_PROMPTS = 16
PROMPT_TOKENS = 1536  # the small model: a few tenths of a second of prefill each, so the last waits seconds
MAX_TOKENS = 4


def retries(mesh) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.http_port}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "kvmesh:request_retries_total")


def lapses(mesh) -> str:
    """What the workers logged of lapsed leases and expired handoffs: the cause, should one lapse."""
    lines = [f"{p.service} {p.address}: {line.rstrip()}" for p in mesh.prefills + mesh.decodes
             for line in p.stderr_lines if "expired" in line or "lapsed" in line or "Traceback" in line]
    return "\n".join(lines[-40:]) or "nothing logged of a lapse"


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_prompts_queued_on_the_prefill_worker_for_many_leases_all_complete(model_dir, transport):
    path = model_dir("llama", "small")
    mesh = start_mesh(str(path), transport=transport,
                      worker_args=("--handoff-lease-s", str(LEASE_S), "--kv-cache-bytes", str(512 * 2**20)))
    try:
        prompts = [[(i * 13 + j * 7) % 4000 + 3 for j in range(PROMPT_TOKENS)] for i in range(NUM_PROMPTS)]
        with concurrent.futures.ThreadPoolExecutor(NUM_PROMPTS) as pool:
            results = list(pool.map(lambda p: mesh.generate(p, MAX_TOKENS, timeout=300, ignore_eos=True), prompts))
        slowest = max(responses[-1].timings.time_to_first_token_seconds for _, responses in results)
        assert slowest > 1.5 * LEASE_S, f"no prompt waited past one and a half leases ({slowest:.2f} s): the case was not made"
        assert retries(mesh) == 0, lapses(mesh)  # none lapsed and was placed again
        for prompt, (got, _) in zip(prompts, results):
            assert got == hf_greedy(path, prompt, MAX_TOKENS)
        assert mesh.wait_blocks_free(15)
    finally:
        mesh.close()
