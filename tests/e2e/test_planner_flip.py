"""The scheduler's planner loop flipping real `--role auto` workers: a mesh of three flexible workers starting as one
prefill and two decode, under a prompt-heavy load (long prompts, two output tokens, several at once), ends with a
decode worker flipped to prefill — ListWorkers lists two prefill workers and one decode worker, the planner's
metric and log record one flip — while every request completes with HF's greedy tokens and nothing leaks (every
block free, no handoff or transfer alive, no shared-memory segment left after a clean stop).

The planner plans with a fixed profile (`--planner-costs profile`, bench/plan-profile-smollm2.json) rather than the
workers' live fits, so whether this load calls for a second prefill worker does not hinge on how fast the loaded
machine ran: by that profile eight 480-token prompts in a 5 s window are predicted to serve ~1.7x faster on 2P+1D
than on 1P+2D (tests/unit/scheduler/test_planner_loop.py covers the choice itself). The hold time keeps it from
flipping back."""

import glob
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForCausalLM

from mesh import free_port, start_mesh
from reference import hf_greedy
from kvmesh.v1 import scheduler_pb2

P, D = scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE
PROFILE = Path(__file__).resolve().parents[2] / "bench" / "plan-profile-smollm2.json"
NUM_CONCURRENT = 8  # requests sent at once each round
MAX_ROUNDS = 15  # rounds of load before the test gives up on a flip
OUTPUT = 2  # tokens each request asks for: a prompt-heavy load


def prompt(round_no: int, i: int) -> list[int]:
    """A distinct 480-token prompt (no prefix shared with another one: each is prefilled in full)."""
    return [(round_no * 131 + i * 37 + j * 7 + (j * j) % 11) % 900 + 3 for j in range(480)]


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def mesh(model_dir, metrics_port):
    planner = ("--planner-interval-s", "1", "--planner-window-s", "5", "--planner-hold-s", "3600",
               "--planner-threshold", "0.1", "--planner-profile", str(PROFILE), "--planner-costs", "profile",
               "--metrics-port", str(metrics_port))
    m = start_mesh(str(model_dir("llama")), prefill=1, decode=2, flexible=True, scheduler_args=planner)
    yield m
    m.close()


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir("llama"))


def roles(mesh) -> dict[str, tuple[int, bool, int]]:
    """address -> (role, flexible, desired role) as the scheduler lists its workers."""
    return {w.address: (w.role, w.flexible, w.desired_role) for w in mesh.workers(scheduler_pb2.WORKER_ROLE_UNSPECIFIED)
            if w.role in (P, D)}


def load_round(mesh, pool, round_no: int) -> list[tuple[list[int], list[int]]]:
    """NUM_CONCURRENT greedy requests at once; (prompt, tokens) of each (a failed request raises)."""
    prompts = [prompt(round_no, i) for i in range(NUM_CONCURRENT)]
    futures = [pool.submit(mesh.generate, p, OUTPUT, 180, ignore_eos=True) for p in prompts]
    return [(p, f.result()[0]) for p, f in zip(prompts, futures)]


def planner_decisions(port: int, action: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    key = f'kvmesh:planner_decisions_total{{action="{action}"}} '
    return sum(float(line[len(key):]) for line in text.splitlines() if line.startswith(key))


def test_flexible_workers_start_as_one_prefill_and_two_decode(mesh):
    start = roles(mesh)
    assert sorted(role for role, _, _ in start.values()) == [P, D, D]
    assert all(flexible and desired == 0 for _, flexible, desired in start.values())


def test_prompt_heavy_load_makes_the_planner_flip_a_decode_worker_to_prefill(mesh, hf, metrics_port):
    decodes = {proc.address for proc in mesh.decodes}
    served, flipped = [], False
    with ThreadPoolExecutor(NUM_CONCURRENT) as pool:
        for round_no in range(MAX_ROUNDS):
            served += load_round(mesh, pool, round_no)  # raises if any request failed
            now = roles(mesh)
            if any(address in decodes and (role == P or desired == P) for address, (role, _, desired) in now.items()):
                flipped = True
                served += load_round(mesh, pool, MAX_ROUNDS + round_no)  # served while (or just after) it flips
                break
    assert flipped, f"no decode worker was flipped to prefill after {MAX_ROUNDS} rounds: {roles(mesh)}\n" \
                    f"{mesh.scheduler.stderr[-3000:]}"
    deadline = time.monotonic() + 60
    while sorted((role, desired) for role, _, desired in roles(mesh).values()) != [(P, 0), (P, 0), (D, 0)]:
        assert time.monotonic() < deadline, f"the flip did not finish within 60 s: {roles(mesh)}"
        time.sleep(0.1)
    final = roles(mesh)
    flipped_to_prefill = [a for a in decodes if final[a][0] == P]
    assert len(flipped_to_prefill) == 1  # one decode worker became prefill, the other still decodes
    assert final[mesh.prefills[0].address][0] == P
    assert planner_decisions(metrics_port, "flip") == 1  # once: the hold time keeps it from flipping back
    assert "planner: flip; current 1P+2D" in mesh.scheduler.stderr
    assert "role flip decode -> prefill done" in next(p for p in mesh.decodes
                                                     if p.address == flipped_to_prefill[0]).stderr
    with ThreadPoolExecutor(NUM_CONCURRENT) as pool:  # served by the new shape: two prefill workers, one decode
        served += load_round(mesh, pool, 2 * MAX_ROUNDS)
    for prompt_ids, tokens in served:
        assert tokens == hf_greedy(hf, prompt_ids, OUTPUT)
    assert mesh.wait_blocks_free(30)


def test_flexible_workers_stop_cleanly_and_leave_no_shared_memory(mesh):
    for proc in mesh.prefills + mesh.decodes:
        pid = proc.proc.pid
        proc.stop(30)
        assert glob.glob(f"/dev/shm/kvmesh-{pid}-*") == []
