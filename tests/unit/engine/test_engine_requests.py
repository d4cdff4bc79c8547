"""Request validation, sampling behaviour, stop conditions and unsupported checkpoints."""

import json
import shutil

import pytest
from engine_helpers import run_all

from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.errors import InvalidRequestError, UnsupportedModelError
from kvmesh.services.engine.sampler import SamplingParams


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine.from_path(model_dir("llama"), num_blocks=40)


@pytest.mark.parametrize("ids, params, message", [
    ([], SamplingParams(), "prompt is empty"),
    ([5] * 1024, SamplingParams(), "shorten the prompt"),
    ([5, 1024], SamplingParams(), "outside the vocabulary"),
    ([5, -1], SamplingParams(), "outside the vocabulary"),
    ([5], SamplingParams(max_tokens=0), "max_tokens must be at least 1"),
    ([5], SamplingParams(top_p=0), r"top_p must lie in \(0, 1\]"),
    ([5], SamplingParams(top_p=1.5), "top_p"),
    ([5], SamplingParams(temperature=-0.1), "temperature must be >= 0"),
    ([5], SamplingParams(top_k=-3), "top_k"),
    ([5], SamplingParams(min_p=2), "min_p"),
    ([5], SamplingParams(logprobs=99), "logprobs"),
    ([5], SamplingParams(stop=("",)), "stop"),
    ([5], SamplingParams(stop_token_ids=(5000,)), "stop_token_ids"),
    ([5] * 600, SamplingParams(max_tokens=500), "lower max_tokens to at most 424"),
    ([5] * 600, SamplingParams(max_tokens=100), "exceeds the KV cache"),
])
def test_bad_requests_raise_actionable_errors(engine, ids, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.validate(ids, params)
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", ids, params)
    assert not engine.has_unfinished()


def test_duplicate_request_id_is_refused(engine):
    engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    run_all(engine)


def test_seeded_sampling_ignores_batch_mates(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123, max_tokens=16)
    alone = run_all(engine, requests={"s": ([10, 11, 12], params)})["tokens"]["s"]
    crowd = {"s": ([10, 11, 12], params)}
    crowd.update({f"o{i}": ([20 + i] * (3 + i), SamplingParams(temperature=1.0, max_tokens=16)) for i in range(5)})
    together = run_all(engine, requests=crowd)["tokens"]["s"]
    assert together == alone
    other_seed = run_all(engine, requests={"t": ([10, 11, 12], SamplingParams(temperature=1.0, seed=7,
                                                                               max_tokens=16))})["tokens"]["t"]
    assert other_seed != alone


def test_top_k_one_is_greedy_and_logprobs_are_reported(engine):
    ids = [30, 31, 32, 33]
    greedy = run_all(engine, requests={"g": (ids, SamplingParams(temperature=0, max_tokens=8))})["tokens"]["g"]
    engine.add_request("k", ids, SamplingParams(temperature=0.7, top_k=1, max_tokens=8, logprobs=3))
    tokens, logprobs = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            logprobs += out.logprobs
    assert tokens == greedy
    assert len(logprobs) == 8
    for token, lp in zip(tokens, logprobs):
        assert lp["token_id"] == token and lp["logprob"] <= 0
        assert len(lp["top"]) == 3 and lp["top"][0][0] == token


def test_stop_string_is_excluded_from_ids_and_text(engine):
    ids = [40, 41, 42]
    free = run_all(engine, requests={"f": (ids, SamplingParams(temperature=0, max_tokens=30,
                                                               ignore_eos=True))})["tokens"]["f"]
    text = engine.tokenizer.decode(free)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    run = run_all(engine, requests={"s": (ids, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                              stop=(stop,)))})
    got = run["tokens"]["s"]
    assert run["reasons"]["s"] == "stop"
    assert stop not in engine.tokenizer.decode(got)
    assert got == free[:len(got)] and len(got) < len(free)
    assert text.startswith(engine.tokenizer.decode(got))


def test_stop_token_ids_and_max_tokens_set_the_finish_reason(engine):
    ids = [50, 51]
    free = run_all(engine, requests={"f": (ids, SamplingParams(temperature=0, max_tokens=6,
                                                               ignore_eos=True))})
    assert free["reasons"]["f"] == "length" and len(free["tokens"]["f"]) == 6
    stop_id = free["tokens"]["f"][2]
    run = run_all(engine, requests={"s": (ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                              stop_token_ids=(stop_id,)))})
    assert run["reasons"]["s"] == "stop"
    assert run["tokens"]["s"] == free["tokens"]["f"][:free["tokens"]["f"].index(stop_id) + 1]


def test_other_architectures_are_refused_by_name(model_dir, tmp_path):
    shutil.copytree(model_dir("llama"), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLMEngine.from_path(tmp_path)


def test_model_id_tells_models_apart(model_dir):
    a = LLMEngine.from_path(model_dir("llama"), num_blocks=2).layout.model_id
    b = LLMEngine.from_path(model_dir("mistral"), num_blocks=2).layout.model_id
    assert a != b and a.startswith(model_dir("llama").name)


def test_sliding_window_caps_the_context(variant_dir):
    path = variant_dir("mistral", "window-64", sliding_window=64)
    engine = LLMEngine.from_path(path, num_blocks=8)
    assert engine.max_model_len == 64
    with pytest.raises(InvalidRequestError, match="context"):
        engine.validate([5] * 70, SamplingParams(max_tokens=1))


def test_kv_pool_can_live_in_caller_memory(model_dir):
    import numpy as np

    path = model_dir("llama")
    probe = LLMEngine.from_path(path, num_blocks=1)
    layout = probe.layout
    storage = np.zeros((layout.num_layers, 2, 6, layout.block_nbytes), dtype=np.uint8)
    engine = LLMEngine.from_path(path, kv_storage=storage)
    assert engine.kv_cache.num_blocks == 6 and np.shares_memory(engine.kv_cache.byte_view(), storage)
    ids = list(range(5, 40))
    got = run_all(engine, requests={"a": (ids, SamplingParams(temperature=0, max_tokens=8))})["tokens"]["a"]
    want = run_all(LLMEngine.from_path(path, num_blocks=6),
                   requests={"a": (ids, SamplingParams(temperature=0, max_tokens=8))})["tokens"]["a"]
    assert got == want and storage.any()
