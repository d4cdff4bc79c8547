"""Greedy output through the whole mesh equals HF transformers token for token — every family, every transport;
the -tls variants closed as a deployment runs (mTLS between services, an API key at the gateway)."""

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mesh import make_certs, start_mesh
from kvmesh.transports import LOCAL_POOL, available_backends
from kvmesh.transports.shm import list_segments
from kvmesh.v1 import gateway_pb2, scheduler_pb2

PROMPTS = ["The capital of France is", "Hello", "def main():\n    print('hello')",
           "A key value cache stores the keys and values of every token that attention has seen, so that " * 3]
MAX_TOKENS = 12
API_KEY = "parity-key-5f1c0e"


def segments_of(pid: int) -> list[str]:
    return [s for s in list_segments() if s.startswith(f"kvmesh-{pid}-")]


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
            if family == "llama" and transport != "shm":  # the KV pool in process memory, not shared memory
                yield pytest.param((family, transport, False, LOCAL_POOL), id=f"{family}-{transport}-localpool",
                                   marks=marks)
        yield pytest.param((family, "colocated", False), id=f"{family}-colocated")  # no split: the baseline's parity
    yield pytest.param(("llama", "colocated", True), id="llama-colocated-tls")
    # a local pool under negotiation: shm is not offered, so the best backend left is used
    yield pytest.param(("llama", "auto", False, LOCAL_POOL), id="llama-auto-localpool")
    # the newer families (the split, on grpc and shm); Gemma's longest prompt crosses its 16-token window
    for family in ("qwen3", "phi3", "mixtral", "qwen2_moe", "gemma2", "gemma3"):
        for transport in ("grpc", "shm"):
            yield pytest.param((family, transport, False), id=f"{family}-{transport}")


@pytest.fixture(scope="module", params=list(_params()))
def family_mesh(request, model_dir, tmp_path_factory):
    family, transport, with_tls, *more = request.param
    path = model_dir(family)
    colocated = transport == "colocated"
    tls_dir = make_certs(tmp_path_factory.mktemp("certs")) if with_tls else ""
    # the -tls variants run closed as a deployment would: mTLS between services and an API key at the gateway
    worker_args = ("--kv-pool", more[0]) if more else ()
    mesh = start_mesh(str(path), transport="auto" if colocated else transport, colocated=colocated, tls_dir=tls_dir,
                      api_key=API_KEY if with_tls else "", worker_args=worker_args)
    if more:  # a local pool: no worker holds a shared-memory segment, and none offers a backend that needs one
        assert [s for w in mesh.prefills + mesh.decodes for s in segments_of(w.proc.pid)] == []
        registered = mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE) + mesh.workers(scheduler_pb2.WORKER_ROLE_PREFILL)
        assert registered and all("shm" not in w.transports and w.transports for w in registered)
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
