"""Colocated workers (`--colocated`): each prefills its own prompts, in chunks mixed into its continuous batch
beside the running decodes, behind the same gateway, scheduler and cache — the baseline disaggregation is measured
against. Its output must be the same as the disaggregated mesh's and HF transformers'."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from mesh import start_mesh
from test_launcher import _up
from test_mesh_parity import hf_greedy
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

CHUNK = 32  # the engine's token budget per step: a longer prompt is prefilled over several steps


@pytest.fixture(scope="module")
def colocated(model_dir):
    path = model_dir("llama")
    mesh = start_mesh(str(path), decode=2, colocated=True,
                      worker_args=("--max-num-batched-tokens", str(CHUNK), "--torch-threads", "1"))
    yield path, mesh
    mesh.close()


def test_colocated_workers_register_and_are_routed_to_without_a_prefill_worker(colocated):
    _, mesh = colocated
    assert mesh.workers(scheduler_pb2.WORKER_ROLE_PREFILL) == []
    decodes = mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)
    assert len(decodes) == 2 and all(w.colocated for w in decodes)
    stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
    route = stub.Route(scheduler_pb2.RouteRequest(request_id="probe", prompt_token_ids=list(range(1, 300)),
                                                  dry_run=True), timeout=5)
    assert not route.HasField("prefill") and route.local_prefill
    assert route.decode.worker_id in {w.worker_id for w in decodes}


def test_long_prompts_prefilled_in_chunks_beside_running_decodes_equal_transformers(colocated):
    """Short requests decode while long prompts (several chunks each) prefill in the same batches: every output is
    HF's greedy output, and every block comes back."""
    path, mesh = colocated
    tokenizer = AutoTokenizer.from_pretrained(path)
    short = [tokenizer.encode(f"Request {i} says hello") for i in range(4)]
    long = [tokenizer.encode(f"Long prompt {i}: a key value cache keeps what attention has seen. " * 12)
            for i in range(2)]
    assert all(len(ids) > 3 * CHUNK for ids in long)
    prompts = [(ids, 24) for ids in short] + [(ids, 6) for ids in long]
    with ThreadPoolExecutor(len(prompts)) as pool:
        outputs = list(pool.map(lambda p: mesh.generate(p[0], p[1], timeout=180, ignore_eos=True), prompts))
    for (ids, max_tokens), (got, responses) in zip(prompts, outputs):
        assert got == hf_greedy(path, ids, max_tokens)
        assert responses[-1].usage.prompt_tokens == len(ids)
    assert mesh.wait_blocks_free(10.0)


def test_up_colocated_answers_once(model_dir):
    _, cmd = _up(model_dir("llama"), "--colocated", "--workers", "2", "--worker-cpus", "0/1", "--once",
                 "The capital of France is", "--max-tokens", "5")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "5 generated]" in done.stdout


def test_up_refuses_a_cpu_list_this_machine_lacks(model_dir):
    _, cmd = _up(model_dir("llama"), "--colocated", "--worker-cpus", "4096", "--once", "Hi", "--max-tokens", "2")
    done = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "cpus '4096' names cores this process cannot use" in done.stdout + done.stderr
