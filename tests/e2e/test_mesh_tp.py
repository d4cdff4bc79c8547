"""Tensor-parallel workers in a mesh: a prefill worker of TP 2 filling a decode worker of TP 1, and TP 1 filling
TP 2, on every transport. On the CPU a worker's ranks share one pool of whole-head blocks (each rank writes its
head slice), so the transfer moves the same blocks whatever either side's degree: greedy output equals HF
transformers' and every block comes back. The ranks are real processes (gloo on 127.0.0.1), and they end with
their worker."""

import os
import time

import pytest
from transformers import AutoTokenizer

from mesh import per_transport, start_mesh
from test_mesh_parity import MAX_TOKENS, PROMPTS, hf_greedy
from kvmesh.v1 import scheduler_pb2


@pytest.fixture(scope="module", params=per_transport(((2, 1), (1, 2)), lambda v: f"-p{v[0]}-d{v[1]}"))
def tp_mesh(request, model_dir):
    transport, prefill_tp, decode_tp = request.param
    path = model_dir("llama")
    mesh = start_mesh(str(path), transport=transport, prefill_args=("--tensor-parallel-size", str(prefill_tp)),
                      decode_args=("--tensor-parallel-size", str(decode_tp)))
    yield path, mesh, prefill_tp, decode_tp
    mesh.close()


def _followers(pid: int) -> list[int]:
    """Pids of a worker's tensor-parallel ranks (its multiprocessing spawn children)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and spawned:
            found.append(int(entry))
    return found


def test_greedy_across_tensor_parallel_degrees_equals_transformers(tp_mesh):
    path, mesh, prefill_tp, decode_tp = tp_mesh
    tp_worker = mesh.prefills[0] if prefill_tp == 2 else mesh.decodes[0]
    assert len(_followers(tp_worker.proc.pid)) == 1  # rank 1 of the TP 2 side
    layouts = {w.layout.num_kv_heads for role in (scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE)
               for w in mesh.workers(role)}
    assert layouts == {2}  # both register whole-head blocks: the tiny llama's 2 KV heads
    tokenizer = AutoTokenizer.from_pretrained(path)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        got, responses = mesh.generate(ids, MAX_TOKENS, ignore_eos=True)
        assert got == hf_greedy(path, ids, MAX_TOKENS), prompt
        assert responses[-1].usage.completion_tokens == MAX_TOKENS
    assert mesh.wait_blocks_free(2.0)


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie no one reaped yet has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_ranks_end_when_their_worker_is_killed(tp_mesh):
    _, mesh, prefill_tp, _ = tp_mesh
    tp_worker = mesh.prefills[0] if prefill_tp == 2 else mesh.decodes[0]
    ranks = _followers(tp_worker.proc.pid)
    assert ranks
    mesh.close()  # SIGKILL to every service: no atexit runs, the ranks see their driver gone and exit
    deadline = time.monotonic() + 60
    while any(map(_running, ranks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, ranks))
