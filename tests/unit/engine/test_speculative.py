"""N-gram speculative decoding: the same greedy tokens as plain decoding, whatever ends a sequence and wherever."""

import pytest
from engine_helpers import FAMILIES, prompts_of_lengths, run_all

from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.errors import InvalidRequestError
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.engine.structured import Constraint
from kvmesh.services.engine.speculative import (NgramSpeculator, SpeculativeConfig, accept_greedy, propose_ngram,
                                                speculates)

NUM_BLOCKS = 400
BF16_TOL = 0.1  # logit gap below which bf16 may pick either of two tokens (as test_engine_parity)
REPEAT = [40, 41, 42, 43, 44, 45] * 6  # a prompt that repeats itself: drafts are found from the first step


def greedy(max_tokens=40, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def make_engine(path, spec: bool, k: int = 4, **kw) -> LLMEngine:
    engine = LLMEngine.from_path(path, num_blocks=kw.pop("num_blocks", NUM_BLOCKS), **kw)
    if spec:
        engine.speculator = NgramSpeculator(SpeculativeConfig(num_speculative_tokens=k), engine.max_model_len)
    return engine


def run_steps(engine, requests: dict) -> tuple[dict, dict, dict]:
    """tokens, finish reasons and the sizes of each request's outputs step by step."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    tokens, reasons, sizes = {}, {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            sizes.setdefault(out.request_id, []).append(len(out.new_token_ids))
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return tokens, reasons, sizes


def test_propose_ngram_takes_what_followed_the_latest_earlier_match_longest_suffix_first():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 1, 3, 2) == [7, 1]
    assert propose_ngram([5, 1, 2, 8, 2], 1, 3, 3) == [8, 2]  # only the 1-gram [2] occurs earlier
    assert propose_ngram([5, 1, 2, 8, 2], 2, 3, 3) == []
    assert propose_ngram([1, 2, 1, 2], 2, 2, 5) == [1, 2]  # the draft stops at the context's end
    assert propose_ngram([1, 2, 3], 1, 3, 0) == [] and propose_ngram([4], 1, 3, 2) == []


def test_accept_greedy_keeps_the_agreeing_prefix_plus_the_models_token():
    assert accept_greedy([5, 6, 7], [5, 6, 9, 1]) == 3
    assert accept_greedy([5, 6, 7], [5, 6, 7, 1]) == 4
    assert accept_greedy([5, 6, 7], [4, 6, 7, 1]) == 1


def test_only_plain_greedy_requests_speculate():
    assert speculates(greedy())
    for params in (SamplingParams(temperature=0.7), greedy(presence_penalty=0.5), greedy(repetition_penalty=1.2),
                   greedy(frequency_penalty=-1.0), greedy(logit_bias=((5, 3.0),)),
                   greedy(structured=Constraint.of("regex", "[a-z]+"))):  # drafts would skip the grammar's mask
        assert not speculates(params)


@pytest.mark.parametrize("config", [SpeculativeConfig(method="eagle"), SpeculativeConfig(num_speculative_tokens=0),
                                    SpeculativeConfig(ngram_min=4, ngram_max=3), SpeculativeConfig(ngram_min=0)])
def test_bad_config_is_refused_with_the_field_named(config):
    with pytest.raises(InvalidRequestError, match="method|num_speculative_tokens|ngram_min"):
        NgramSpeculator(config, 128)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_identical_with_and_without_speculation_in_a_mixed_batch(model_dir, family, prefix_caching):
    path = model_dir(family)
    requests = {f"rand{i}": (p, greedy(48)) for i, p in enumerate(prompts_of_lengths([3, 17, 40, 90], seed=4))}
    requests |= {"repeat": (REPEAT, greedy(60)), "again": (REPEAT[:20], greedy(30)),
                 "sampled": (REPEAT, SamplingParams(temperature=0.8, seed=11, max_tokens=30, ignore_eos=True)),
                 "penalised": (REPEAT, greedy(30, presence_penalty=1.0)), "eos": (REPEAT, SamplingParams(
                     temperature=0, max_tokens=60)), "logprobs": (REPEAT, greedy(30, logprobs=2))}
    plain_engine = make_engine(path, False, enable_prefix_caching=prefix_caching)
    spec_engine = make_engine(path, True, enable_prefix_caching=prefix_caching)
    plain, spec = run_steps(plain_engine, requests), run_steps(spec_engine, requests)
    assert spec[0] == plain[0] and spec[1] == plain[1]
    stats = spec_engine.speculator.stats()
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]  # drafts both kept and rejected
    assert max(max(s) for s in spec[2].values()) > 1 and max(max(s) for s in plain[2].values()) <= 2
    assert spec_engine.num_free_blocks == NUM_BLOCKS == plain_engine.num_free_blocks


def test_logprobs_of_accepted_tokens_match_plain_decoding(model_dir):
    path = model_dir("llama")
    requests = {"lp": (REPEAT, greedy(40, logprobs=3))}
    outs = []
    for spec in (False, True):
        engine = make_engine(path, spec)
        engine.add_request("lp", *requests["lp"])
        entries = []
        while engine.has_unfinished():
            for out in engine.step():
                entries += out.logprobs
        outs.append(entries)
    assert [e["token_id"] for e in outs[0]] == [e["token_id"] for e in outs[1]] and len(outs[0]) == 40
    for a, b in zip(*outs):
        assert abs(a["logprob"] - b["logprob"]) < 1e-4
        assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]


def test_max_tokens_stop_tokens_and_stop_strings_inside_accepted_runs_end_where_plain_greedy_does(model_dir):
    path = model_dir("llama")
    free, _, sizes = run_steps(make_engine(path, True, k=6), {"free": (REPEAT, greedy(60))})
    free = free["free"]
    ends = [sum(sizes["free"][:i + 1]) for i in range(len(sizes["free"]))]
    inside = [n for start, end in zip([0] + ends, ends) if end - start > 2 for n in range(start + 1, end)]
    assert inside, "the repetitive prompt must yield accepted runs of 2+ draft tokens"
    text = make_engine(path, False).tokenizer.decode(free)
    requests = {f"max{n}": (REPEAT, greedy(n)) for n in inside}
    requests |= {f"tok{n}": (REPEAT, greedy(60, stop_token_ids=(free[n - 1],))) for n in inside}
    requests |= {f"str{n}": (REPEAT, greedy(60, stop=(text[n:n + 2],))) for n in range(2, len(text) - 2, 3)
                 if text[n:n + 2].strip()}
    plain = run_steps(make_engine(path, False), requests)
    spec = run_steps(make_engine(path, True, k=6), requests)
    assert spec[0] == plain[0] and spec[1] == plain[1]
    assert {plain[1][f"max{n}"] for n in inside} == {"length"} and {plain[1][f"tok{n}"] for n in inside} == {"stop"}
    assert all(len(plain[0][f"max{n}"]) == n for n in inside)


def test_blocks_all_return_after_finish_abort_and_preemption_with_drafts(model_dir):
    path = model_dir("llama")
    engine = make_engine(path, True, k=8, num_blocks=12, max_num_batched_tokens=64)
    for i in range(5):
        engine.add_request(f"r{i}", REPEAT[i:], greedy(50))
    for step in range(40):
        engine.step()
        if step == 6:
            engine.abort("r1")
        for seq in engine.scheduler.running:  # blocks never outgrow the tokens after a step
            assert len(seq.block_table) <= -(-seq.num_tokens // 16)
            assert seq.num_computed_tokens == seq.num_tokens - 1 or seq.num_output_tokens == 0
    engine.abort("r2")
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_preemptions > 0 and engine.speculator.stats()["accepted_tokens"] > 0
    assert engine.num_free_blocks == 12
    assert all(engine.allocator.refcount(b) == 0 for b in range(12))


def test_drafts_stay_within_the_step_token_budget(model_dir):
    engine = make_engine(model_dir("llama"), True, k=8, max_num_batched_tokens=3)
    seen = []
    original = engine.speculator.plan
    engine.speculator.plan = lambda scheduled, scheduler: seen.append(
        (sum(n for _, n in scheduled), drafts := original(scheduled, scheduler))) or drafts
    run_all(engine, requests={"a": (REPEAT, greedy(20)), "b": (REPEAT[3:], greedy(20))})
    assert seen and all(n + sum(map(len, d.values())) <= 3 for n, d in seen)
    assert any(d for _, d in seen)


def test_bfloat16_speculation_departs_from_float32_greedy_only_at_near_ties(model_dir, hf_model):
    """In bf16 a verify span (K+1 rows, the chunked-prefill attention) rounds differently from one-token steps, as
    batching does: tokens may differ from plain bf16 greedy, but only where fp32 rates them within BF16_TOL of
    its best (float32 is token for token, above)."""
    import torch

    path = model_dir("llama")
    prompts = [REPEAT, *prompts_of_lengths([9, 30], seed=5)]
    engine = make_engine(path, True, dtype="bfloat16")
    got, _, _ = run_steps(engine, {str(i): (p, greedy(40)) for i, p in enumerate(prompts)})
    assert engine.speculator.stats()["accepted_tokens"] > 0
    ref = hf_model(path)
    for i, prompt in enumerate(prompts):
        logits = ref(torch.tensor([prompt + got[str(i)]])).logits[0, len(prompt) - 1:-1]
        best = logits.max(-1).values
        for j, token in enumerate(got[str(i)]):
            assert (best[j] - logits[j, token]).item() <= BF16_TOL, f"prompt {i} token {j}"


def test_step_chunks_count_a_verify_span_as_the_positions_it_computes(model_dir):
    """The step's chunks (what a worker reports to the scheduler's cost models) include every drafted position."""
    engine = make_engine(model_dir("llama"), True, k=4)
    engine.add_request("r", REPEAT, greedy(30))
    spans = []
    while engine.has_unfinished():
        before = engine.scheduler.running[0].num_tokens if engine.scheduler.running else 0
        engine.step()
        if before:
            spans.append(engine.step_chunks["r"])
    assert any(n > 1 for _, n in spans) and all(n <= 5 for _, n in spans)
