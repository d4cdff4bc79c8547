"""KV transports through the whole mesh, degraded on purpose: greedy parity survives delay and throttling, a
corrupted transfer fails the request with DATA_LOSS (never a token from bad KV) and frees every block, and layers
leave the prefill worker while later layers are still computing."""

import json
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from transformers import AutoTokenizer

from mesh import start_mesh
from test_mesh_parity import hf_greedy
from kvmesh.services.trace.spans import read_jsonl
from kvmesh.v1 import common_pb2, gateway_pb2

PROMPTS = ["The capital of France is", "def main():\n    print('hello')"]
MAX_TOKENS = 8


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_greedy_parity_holds_under_delay_and_throttle(model_dir, transport):
    path = model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    mesh = start_mesh(str(path), transport=transport, chaos="delay=2ms,throttle=50MBps")
    try:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            got, _ = mesh.generate(ids, MAX_TOKENS, ignore_eos=True)
            assert got == hf_greedy(path, ids, MAX_TOKENS), prompt
        assert mesh.wait_blocks_free(2.0)
    finally:
        mesh.close()


def _http_completion(mesh, prompt: str) -> tuple[int, dict]:
    with urllib.request.urlopen(f"{mesh.http_base}/models", timeout=10) as reply:
        model = json.loads(reply.read())["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(f"{mesh.http_base}/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_corrupted_transfer_fails_with_data_loss_and_frees_every_block(model_dir, transport):
    mesh = start_mesh(str(model_dir("llama")), transport=transport, chaos="corrupt=1")
    try:
        request = gateway_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7, 8, 9] * 7,
                                              sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8))
        tokens = []
        with pytest.raises(grpc.RpcError) as failure:
            for response in mesh.gateway_stub().Generate(request, timeout=30):
                tokens += response.token_ids
        assert failure.value.code() == grpc.StatusCode.DATA_LOSS, failure.value.details()
        assert tokens == []  # not one token decoded from the damaged KV
        status, body = _http_completion(mesh, "Hello there, general")
        assert status == 502 and "checksum" in body["error"]["message"], body
        assert mesh.wait_blocks_free(3.0)
    finally:
        mesh.close()


def _spans_of_one_request(path, names: set[str], timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        spans = read_jsonl(path) if path.exists() else []
        found = {}
        for span in spans:
            if "kvmesh.kv.layer" in span.attributes:  # the prefill worker's span around one layer's send
                continue
            direction = span.attributes.get("kvmesh.kv.direction", "")
            found[(span.name, direction) if span.name == "kv.transfer" else span.name] = span
        if names <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_layers_are_sent_while_later_layers_compute_and_decode_admits_after_the_last_lands(model_dir, tmp_path):
    path = model_dir("llama", "small")  # 8 layers, slow enough here that one layer takes tens of ms
    traces = tmp_path / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(traces), "OTEL_BSP_SCHEDULE_DELAY": "50"}
    mesh = start_mesh(str(path), transport="shm", env=env)
    try:
        prompt = np.random.default_rng(0).integers(10, 4000, 1200).tolist()  # one engine step (budget 2048)
        got, _ = mesh.generate(prompt, max_tokens=2, ignore_eos=True)
        assert len(got) == 2
        want = {"prefill.compute", ("kv.transfer", "send"), ("kv.transfer", "recv"), "decode.admit"}
        spans = _spans_of_one_request(traces, want)
        assert want <= set(spans), sorted(map(str, spans))
    finally:
        mesh.close()
    compute, send = spans["prefill.compute"], spans[("kv.transfer", "send")]
    sent = sorted(t for name, t in send.events if name == "kv.layer_sent")
    assert len(sent) == 8
    # Layer 0 is done after about 1/8 of the compute; sent only after the compute, it would be later than its end.
    assert sent[0] < compute.end - 0.25 * compute.duration, (sent[0] - compute.start, compute.duration)
    # The decode worker admits the sequence only once the receiver verified the last layer.
    assert spans["decode.admit"].start >= spans[("kv.transfer", "recv")].end


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_kv_load_failure_recompute_prefills_on_the_decode_worker_instead(model_dir, transport):
    """`--kv-load-failure recompute`: every transfer arrives corrupt, yet every request is served, token for
    token as HF's, each prompt prefilled again on the decode worker, and no block is left taken."""
    path = model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    mesh = start_mesh(str(path), transport=transport, chaos="corrupt=1",
                      env={"KVMESH_DECODE_KV_LOAD_FAILURE": "recompute"})
    try:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            got, _ = mesh.generate(ids, MAX_TOKENS, ignore_eos=True)
            assert got == hf_greedy(path, ids, MAX_TOKENS), prompt
        assert mesh.decodes[0].stderr.count("prefilling it here instead") == len(PROMPTS), mesh.decodes[0].stderr
        assert mesh.wait_blocks_free(3.0)
    finally:
        mesh.close()
