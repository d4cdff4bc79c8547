"""Greedy through the whole mesh with n-gram speculative decoding on the decode worker equals HF transformers token
for token (decode-only speculation is where disaggregated systems went wrong: parity through the mesh is the test);
several tokens arrive per streamed message, and the worker counts drafted and accepted tokens."""

import re
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mesh import start_mesh

REPEAT = [40, 41, 42, 43, 44, 45] * 6  # drafts are found from the first decode step on
MAX_TOKENS = 32
SPEC_ENV = {"KVMESH_DECODE_SPECULATIVE": "ngram", "KVMESH_DECODE_NUM_SPECULATIVE_TOKENS": "4",
            "KVMESH_METRICS_PORT": "0"}


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def decode_counter(mesh, name: str) -> float:
    url = re.search(r"kvmesh \S+ metrics on (http://\S+/metrics)", mesh.decodes[0].stdout).group(1)
    with urllib.request.urlopen(url, timeout=5) as reply:
        found = re.search(rf"^kvmesh:{name}_total (\S+)$", reply.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_speculative_greedy_through_the_mesh_equals_transformers(model_dir, transport):
    path = model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    mesh = start_mesh(str(path), transport=transport, env=SPEC_ENV)
    try:
        for ids in (REPEAT, tokenizer.encode("The capital of France is")):
            got, responses = mesh.generate(ids, MAX_TOKENS, ignore_eos=True)
            assert got == hf_greedy(hf, ids, MAX_TOKENS)
            assert responses[-1].usage.completion_tokens == MAX_TOKENS
            assert "".join(r.text for r in responses) == tokenizer.decode(got, skip_special_tokens=True)
        got, responses = mesh.generate(REPEAT, MAX_TOKENS, ignore_eos=True, logprobs=2)
        assert max(len(r.token_ids) for r in responses) > 1  # accepted drafts stream several tokens at once
        assert [lp.token_id for r in responses for lp in r.logprobs] == got
        stop_at = next(i for i in range(5, MAX_TOKENS) if got[i] not in got[:i])
        cut, responses = mesh.generate(REPEAT, MAX_TOKENS, ignore_eos=True, stop_token_ids=[got[stop_at]])
        assert cut == got[:stop_at + 1] and responses[-1].usage.completion_tokens == stop_at + 1
        drafted, accepted = (decode_counter(mesh, f"spec_decode_{n}_tokens") for n in ("draft", "accepted"))
        assert 0 < accepted <= drafted
        assert mesh.wait_blocks_free(2.0)
    finally:
        mesh.close()
