"""Greedy output through the whole mesh equals HF transformers token for token — every family, every transport;
the -tls variants closed as a deployment runs (mTLS between services, an API key at the gateway)."""

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mesh import make_certs, start_mesh
from kvmesh.transports import available_backends
from kvmesh.v1 import gateway_pb2

PROMPTS = ["The capital of France is", "Hello", "def main():\n    print('hello')",
           "A key value cache stores the keys and values of every token that attention has seen, so that " * 3]
MAX_TOKENS = 12
API_KEY = "parity-key-5f1c0e"


def hf_greedy(path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def _params():
    for family in ("llama", "qwen2", "mistral"):
        for transport in ("grpc", "shm", "ucx"):
            marks = []
            if transport not in available_backends():
                marks.append(pytest.mark.skip(reason=f"{transport} backend unavailable here (install kvmesh[ucx])"))
            yield pytest.param((family, transport, False), id=f"{family}-{transport}", marks=marks)
            if family == "llama":  # mTLS between every service, over every transport
                yield pytest.param((family, transport, True), id=f"{family}-{transport}-tls", marks=marks)
        yield pytest.param((family, "colocated", False), id=f"{family}-colocated")  # no split: the baseline's parity
    yield pytest.param(("llama", "colocated", True), id="llama-colocated-tls")
    # the newer families (the split, on grpc and shm); Gemma's longest prompt crosses its 16-token window
    for family in ("qwen3", "phi3", "mixtral", "qwen2_moe", "gemma2", "gemma3"):
        for transport in ("grpc", "shm"):
            yield pytest.param((family, transport, False), id=f"{family}-{transport}")


@pytest.fixture(scope="module", params=list(_params()))
def family_mesh(request, model_dir, tmp_path_factory):
    family, transport, with_tls = request.param
    path = model_dir(family)
    colocated = transport == "colocated"
    tls_dir = make_certs(tmp_path_factory.mktemp("certs")) if with_tls else ""
    # the -tls variants run closed as a deployment would: mTLS between services and an API key at the gateway
    mesh = start_mesh(str(path), transport="auto" if colocated else transport, colocated=colocated, tls_dir=tls_dir,
                      api_key=API_KEY if with_tls else "")
    yield path, mesh
    mesh.close()


def test_greedy_through_the_mesh_equals_transformers(family_mesh):
    path, mesh = family_mesh
    tokenizer = AutoTokenizer.from_pretrained(path)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        got, responses = mesh.generate(ids, MAX_TOKENS, ignore_eos=True)
        assert got == hf_greedy(path, ids, MAX_TOKENS), prompt
        last = responses[-1]
        assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == MAX_TOKENS
        assert "".join(r.text for r in responses) == tokenizer.decode(got, skip_special_tokens=True)
    assert mesh.wait_blocks_free(2.0)
    if mesh.api_key:  # closed: the same request without the key is refused before it reaches the mesh
        with pytest.raises(grpc.RpcError) as refused:
            list(mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7]), timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_workers_with_the_gather_attention_fallback_give_the_same_greedy_output(model_dir):
    """`--attention gather` (the pure-torch fallback to the default paged attention) through the split mesh."""
    path = model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    mesh = start_mesh(str(path), transport="grpc", worker_args=("--attention", "gather"))
    try:
        for prompt in PROMPTS[2:]:
            ids = tokenizer.encode(prompt)
            got, _ = mesh.generate(ids, MAX_TOKENS, ignore_eos=True)
            assert got == hf_greedy(path, ids, MAX_TOKENS), prompt
        assert mesh.wait_blocks_free(2.0)
    finally:
        mesh.close()
