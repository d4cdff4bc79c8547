"""Borrowed KV memory (`--kv-spill cache`) with real processes: a decode worker whose pool holds only a part of its
four long sequences spills their oldest blocks to the cache service and pages them back through the transports.
Greedy outputs equal HF's, nothing is preempted, blocks spilled and paged back are counted, and nothing is left
held afterwards — after cancelling streams while their blocks are out, too."""

import glob
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import start_mesh
from kvmesh.v1 import common_pb2, gateway_pb2

BLOCK = 16
BLOCK_BYTES = 4 * 2 * BLOCK * 2 * 32 * 4  # the tiny llama: 4 layers, K and V, 2 KV heads of 32, float32
POOL_BLOCKS = 24
PROMPT_TOKENS, MAX_TOKENS = 60, 200  # 17 blocks each at the end: four need 68, the pool holds 24
PROMPTS = [[(i * 37 + j * 11) % 1000 + 3 for j in range(PROMPT_TOKENS)] for i in range(4)]


def metric(proc, name: str, labels: str = "") -> float:
    """A counter's value in the /metrics the process printed it serves (0 when not yet reported)."""
    url = re.search(r"kvmesh \S+ metrics on (http://\S+/metrics)", proc.stdout).group(1)
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def shm_segments() -> set[str]:
    return set(glob.glob("/dev/shm/kvmesh-*"))


@pytest.fixture(scope="module")
def mesh(model_dir):
    mesh = start_mesh(str(model_dir("llama")), transport="shm",
                      worker_args=("--kv-cache-bytes", str(POOL_BLOCKS * BLOCK_BYTES)),
                      env={"KVMESH_DECODE_KV_SPILL": "cache", "KVMESH_METRICS_PORT": "0",
                           "KVMESH_DECODE_TRANSPORT_CHECK_S": "0"})
    try:
        yield mesh
    finally:
        mesh.close()


def hf_greedy(path, prompts, max_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path)
    return [model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def test_long_sequences_spill_and_page_back_with_hf_outputs_and_no_preemption(mesh, model_dir):
    decode = mesh.decodes[0]
    assert mesh.worker_stats(decode, "decode").num_total_blocks == POOL_BLOCKS
    mesh.gateway_stub()  # one channel, made before the threads share it
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: mesh.generate(p, MAX_TOKENS, timeout=300, ignore_eos=True)[0], PROMPTS))
    assert got == hf_greedy(model_dir("llama"), PROMPTS, MAX_TOKENS)
    assert mesh.wait_blocks_free(10.0)  # Stats also brings the worker's preemption count to its /metrics
    assert metric(decode, "kvmesh:num_preemptions_total") == 0
    spilled = metric(decode, "kvmesh:kv_blocks_spilled_total")
    assert spilled > 0
    recomputed = metric(decode, "kvmesh:kv_blocks_paged_back_total", '{outcome="recomputed"}')
    assert (metric(decode, "kvmesh:kv_blocks_paged_back_total", '{outcome="paged_back"}'), recomputed) == \
        (spilled, 0), "\n".join(line for line in decode.stderr.splitlines() if "cache" in line.lower())


def test_cancelling_streams_whose_blocks_are_spilled_leaves_nothing_held(mesh, model_dir):
    decode = mesh.decodes[0]
    before, segments = metric(decode, "kvmesh:kv_blocks_spilled_total"), shm_segments()
    stub = mesh.gateway_stub()
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    calls = [stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids=p, sampling=params), timeout=300)
             for p in PROMPTS]
    deadline = time.monotonic() + 120
    while metric(decode, "kvmesh:kv_blocks_spilled_total") == before:  # blocks are out in the cache
        assert time.monotonic() < deadline, "nothing was spilled"
        time.sleep(0.05)
    for call in calls:
        call.cancel()
    assert mesh.wait_blocks_free(30.0)  # pool all free, no handoff or transfer alive on any worker
    assert shm_segments() <= segments  # no segment left behind by the page-backs that were cut short
    assert metric(decode, "kvmesh:num_preemptions_total") == 0
    got, _ = mesh.generate(PROMPTS[0], 8, timeout=120, ignore_eos=True)  # and the worker serves on
    assert got == hf_greedy(model_dir("llama"), PROMPTS[:1], 8)[0]
