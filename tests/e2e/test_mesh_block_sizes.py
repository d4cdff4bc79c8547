"""Prefill and decode workers of different block sizes (16 -> 32, 32 -> 16): the transfer re-chunks the prompt's
tokens into the decode worker's blocks, so greedy output equals HF transformers' — a whole prompt, and a prompt
whose leading blocks the decode worker's own prefix cache holds (only the rest is sent, starting inside a prefill
block when 32 -> 16). A pair whose KV cannot be mapped (another dtype) is refused, naming what differs."""

import grpc
import pytest
from transformers import AutoTokenizer

from mesh import per_transport, start_mesh
from test_mesh_parity import MAX_TOKENS, PROMPTS, hf_greedy
from kvmesh.v1 import scheduler_pb2


@pytest.fixture(scope="module", params=per_transport(((16, 32), (32, 16)), lambda v: f"-p{v[0]}-d{v[1]}"))
def hetero_mesh(request, model_dir):
    transport, prefill_bs, decode_bs = request.param
    path = model_dir("llama")
    mesh = start_mesh(str(path), transport=transport, prefill_args=("--block-size", str(prefill_bs)),
                      decode_args=("--block-size", str(decode_bs)))
    yield path, mesh, prefill_bs, decode_bs
    mesh.close()


def test_greedy_across_block_sizes_equals_transformers(hetero_mesh):
    path, mesh, prefill_bs, decode_bs = hetero_mesh
    registered = {w.layout.block_size for role in (scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE)
                  for w in mesh.workers(role)}
    assert registered == {prefill_bs, decode_bs}
    tokenizer = AutoTokenizer.from_pretrained(path)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        got, responses = mesh.generate(ids, MAX_TOKENS, ignore_eos=True)
        assert got == hf_greedy(path, ids, MAX_TOKENS), prompt
        assert responses[-1].usage.completion_tokens == MAX_TOKENS
    assert mesh.wait_blocks_free(2.0)


def test_a_prompt_partly_in_the_decode_pool_sends_the_rest_re_chunked(hetero_mesh):
    path, mesh, prefill_bs, decode_bs = hetero_mesh
    tokenizer = AutoTokenizer.from_pretrained(path)
    shared = tokenizer.encode(PROMPTS[-1])[:48]  # three 16-token blocks, one and a half 32-token ones
    first = shared + tokenizer.encode(" and the first continuation of it, which is long enough to need a prefill worker")
    second = shared + tokenizer.encode(" but then another tail, also long enough that the decode worker does not prefill it")
    hits = []
    for ids in (first, second):  # the second finds the shared blocks in the decode worker's pool
        got, _ = mesh.generate(ids, MAX_TOKENS, ignore_eos=True)
        assert got == hf_greedy(path, ids, MAX_TOKENS)
        hits.append(mesh.worker_stats(mesh.decodes[0], "decode").prefix_hit_blocks)
    assert hits[1] - hits[0] == 48 // decode_bs  # the shared full blocks: 1 of 32 tokens, or 3 of 16
    assert mesh.wait_blocks_free(2.0)


def test_a_pair_of_another_dtype_is_refused_naming_it(model_dir):
    mesh = start_mesh(str(model_dir("llama")), transport="grpc", prefill_args=("--dtype", "float32"),
                      decode_args=("--dtype", "bfloat16", "--block-size", "32"))
    try:
        with pytest.raises(grpc.RpcError) as refused:
            mesh.generate([5, 6, 7, 8], 4)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "dtype 'float32' != 'bfloat16'" in refused.value.details()
        assert mesh.all_blocks_free()
        assert mesh.gateway.proc.poll() is None and mesh.scheduler.proc.poll() is None
    finally:
        mesh.close()
