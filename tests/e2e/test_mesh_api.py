"""The mesh's client-facing contract: OpenAI HTTP and gRPC give the model's tokens; concurrency; bad input."""

import concurrent.futures

import grpc
import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mesh import start_mesh
from kvmesh.v1 import common_pb2, gateway_pb2

PROMPT = "The capital of France is"
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def tiny(model_dir):
    path = model_dir("llama")
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def mesh(tiny):
    m = start_mesh(str(tiny[0]), prefill=2, decode=2)
    yield m
    m.close()


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=mesh.http_base, api_key="unused", max_retries=0, timeout=60)


def test_openai_completions_equal_transformers(mesh, client, tiny):
    path, tokenizer, model = tiny
    want = tokenizer.decode(hf_greedy(model, tokenizer.encode(PROMPT), MAX_TOKENS), skip_special_tokens=True)
    whole = client.completions.create(model=path.name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == want
    assert whole.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert whole.usage.completion_tokens == MAX_TOKENS
    chunks = list(client.completions.create(model=path.name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_openai_chat_equals_transformers(mesh, client, tiny):
    path, tokenizer, model = tiny
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]}]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story"}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
    want = tokenizer.decode(hf_greedy(model, list(ids), MAX_TOKENS), skip_special_tokens=True)
    whole = client.chat.completions.create(model=path.name, messages=messages, max_completion_tokens=MAX_TOKENS,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == want
    assert whole.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=path.name, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_openai_models_and_health(mesh, client, tiny):
    assert [m.id for m in client.models.list().data] == [tiny[0].name]
    assert httpx.get(f"http://127.0.0.1:{mesh.http_port}/health").status_code == 200


def test_32_concurrent_streams_are_all_correct(mesh, tiny):
    _, tokenizer, model = tiny
    prompts = [tokenizer.encode(f"Story number {i}: once upon a time " + "x" * (i % 7)) for i in range(32)]
    want = {tuple(p): hf_greedy(model, p, 8) for p in prompts}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda p: mesh.generate(p, 8, ignore_eos=True)[0], prompts))
    assert [g == want[tuple(p)] for g, p in zip(got, prompts)] == [True] * 32
    assert mesh.wait_blocks_free(2.0)


def grpc_error(mesh, **request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(**request), timeout=30))
    return info.value


@pytest.mark.parametrize("request_fields, code, words", [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of prompt"),
    (dict(prompt="hi", prompt_token_ids=[1, 2]), grpc.StatusCode.INVALID_ARGUMENT, "both were set"),
    (dict(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens"),
    (dict(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=10**9)), grpc.StatusCode.INVALID_ARGUMENT,
     "context"),
    (dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    (dict(prompt="hi", model="gpt-17"), grpc.StatusCode.NOT_FOUND, "not served here"),
    (dict(prompt_token_ids=[10**6]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    (dict(prompt="x" * (10 * 2**20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
def test_bad_grpc_requests_get_clear_statuses(mesh, request_fields, code, words):
    error = grpc_error(mesh, **request_fields)
    assert error.code() == code and words in error.details()
    assert mesh.generate([1, 2, 3], 2)[0]  # still healthy


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10**9}, 400, "context"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "model": "gpt-17"}, 404, "not served here"),
    ({"prompt": "x" * (10 * 2**20)}, 413, "exceeds the limit"),
    ({"max_tokens": 3}, 400, "prompt"),
])
def test_bad_http_requests_get_openai_errors(mesh, body, status, words):
    reply = httpx.post(f"{mesh.http_base}/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    assert words in reply.json()["error"]["message"]
    assert httpx.post(f"{mesh.http_base}/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_garbage_bytes_on_the_kv_transfer_rpc_are_refused(mesh):
    channel = mesh.channel(mesh.decodes[0].address)
    push = channel.stream_unary("/kvmesh.v1.KVTransfer/Push", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        push(iter([b"\xff\x00garbage" * 100]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a well-formed KVChunk" in info.value.details() and "Wire format" not in info.value.details()
    assert mesh.generate([1, 2, 3], 2)[0]


def test_every_token_has_its_logprob_when_a_stop_string_is_set(mesh, client, tiny):
    """With a stop string the first token is not sent ahead of the engine (a stop may still cut it): its logprob,
    computed by the prefill worker, must travel with it — over gRPC and over HTTP."""
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2,
                                         stop=["never appears in the output"])
    responses = list(mesh.gateway_stub().Generate(
        gateway_pb2.GenerateRequest(prompt="The capital of France is", sampling=sampling), timeout=60))
    tokens = [t for r in responses for t in r.token_ids]
    entries = [e for r in responses for e in r.logprobs]
    assert len(tokens) == 5 and [e.token_id for e in entries] == tokens
    reply = client.completions.create(model=tiny[0].name, prompt="The capital of France is", max_tokens=3,
                                      temperature=0, logprobs=2, stop=["never appears in the output"],
                                      extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == reply.usage.completion_tokens == 3
