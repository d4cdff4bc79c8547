"""Prefill on one engine, decode on another: reserve, KV export/import, add_prefilled, prefill_only, release."""

import pytest
import torch
from engine_helpers import FAMILIES, prompts_of_lengths, run_all

from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.errors import InvalidRequestError, OutOfBlocksError
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.kv_identity import full_block_hashes

GREEDY = SamplingParams(temperature=0, max_tokens=20)


def prefill(engine, rid, ids, params=GREEDY, **kw):
    engine.add_request(rid, ids, params, prefill_only=True, **kw)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    (out,) = [o for o in outs if o.request_id == rid]
    assert out.finished and out.finish_reason == "prefill" and len(out.new_token_ids) == 1
    return out.new_token_ids[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_export_import_then_decode_matches_one_engine(model_dir, family):
    path = model_dir(family)
    ids = prompts_of_lengths([37], seed=7)[0]
    want = run_all(LLMEngine.from_path(path, num_blocks=16), requests={"r": (ids, GREEDY)})["tokens"]["r"]
    pre = LLMEngine.from_path(path, num_blocks=16, max_num_batched_tokens=16)  # chunked prefill
    dec = LLMEngine.from_path(path, num_blocks=24)
    first = prefill(pre, "r", ids)
    src_blocks = pre.block_table("r")
    assert pre.num_free_blocks == 16 - 3  # blocks are kept for the transfer
    dst_blocks = dec.reserve("r", len(ids))
    dec.kv_cache.import_blocks(dst_blocks, pre.kv_cache.export_blocks(src_blocks))
    pre.release("r")
    pre.release("r")  # idempotent
    assert pre.num_free_blocks == 16
    dec.add_prefilled("r", ids, first, GREEDY)
    got = run_all(dec)["tokens"]["r"]
    assert got == want and got[0] == first
    assert dec.num_free_blocks == 24


def test_prefill_with_cached_prefix_computes_only_the_rest(model_dir):
    path = model_dir("llama")
    ids = prompts_of_lengths([45], seed=8)[0]
    full = LLMEngine.from_path(path, num_blocks=8)
    first = prefill(full, "a", ids)
    part = LLMEngine.from_path(path, num_blocks=8)
    blocks = part.reserve("a", len(ids))
    part.kv_cache.import_blocks(blocks[:2], full.kv_cache.export_blocks(full.block_table("a")[:2]))
    seen = []
    part.set_layer_hook(lambda layer, rids: seen.append((layer, tuple(rids), part.step_chunks[rids[0]])))
    assert prefill(part, "a", ids, num_cached_tokens=32) == first
    assert seen == [(i, ("a",), (32, 13)) for i in range(part.layout.num_layers)]
    # identical KV for the computed rest, so a decode engine could take either copy
    ours = torch.from_numpy(part.kv_cache.export_blocks(blocks)).view(torch.float32)
    theirs = torch.from_numpy(full.kv_cache.export_blocks(full.block_table("a"))).view(torch.float32)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_reserve_raises_when_blocks_run_out_and_release_frees(model_dir):
    engine = LLMEngine.from_path(model_dir("llama"), num_blocks=4)
    engine.reserve("a", 40)
    with pytest.raises(OutOfBlocksError):
        engine.reserve("b", 40)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.reserve("a", 5)
    engine.release("a")
    assert engine.num_free_blocks == 4
    with pytest.raises(InvalidRequestError, match="reserve"):
        engine.add_prefilled("zz", [5, 6], 7, GREEDY)


def test_add_prefilled_emits_first_token_and_stops_at_max_tokens(model_dir):
    engine = LLMEngine.from_path(model_dir("qwen2"), num_blocks=8)
    engine.reserve("a", 3)
    engine.add_prefilled("a", [5, 6, 7], 42, SamplingParams(temperature=0, max_tokens=1))
    (out,) = engine.step()
    assert out.new_token_ids == [42] and out.finished and out.finish_reason == "length"
    assert engine.num_free_blocks == 8 and not engine.has_unfinished()


def test_add_prefilled_reports_the_first_tokens_logprob_with_it(model_dir):
    engine = LLMEngine.from_path(model_dir("qwen2"), num_blocks=8)
    engine.reserve("a", 3)
    first = {"logprob": -0.25, "top": [(42, -0.25), (7, -2.0)]}
    engine.add_prefilled("a", [5, 6, 7], 42, SamplingParams(temperature=0, max_tokens=2, logprobs=2), first)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [t for o in outputs for t in o.new_token_ids][0] == 42
    assert [e for o in outputs for e in o.logprobs][0] == first  # the prefill worker's entry, not a gap
    assert len([e for o in outputs for e in o.logprobs if e is not None]) == 2


def test_release_of_running_request_frees_blocks(model_dir):
    engine = LLMEngine.from_path(model_dir("mistral"), num_blocks=8)
    engine.add_request("a", list(range(5, 30)), SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    assert engine.num_free_blocks < 8
    engine.release("a")
    assert engine.num_free_blocks == 8 and not engine.has_unfinished()


def test_prefill_only_keeps_blocks_even_when_the_first_token_would_end_the_request(model_dir):
    engine = LLMEngine.from_path(model_dir("llama"), num_blocks=8)
    ids = list(range(5, 25))
    first = prefill(engine, "p", ids, SamplingParams(temperature=0, max_tokens=1))
    assert len(engine.block_table("p")) == 2 and engine.num_free_blocks == 6
    engine.abort("p")  # abort frees a prefilled request too
    assert engine.num_free_blocks == 8
    # the decode side applies the stop rules to the first token
    engine.reserve("d", len(ids))
    engine.add_prefilled("d", ids, first, SamplingParams(temperature=0, max_tokens=1))
    outs = {o.request_id: o for o in engine.step()}
    assert outs["p"].finish_reason == "abort"
    assert outs["d"].new_token_ids == [first] and outs["d"].finish_reason == "length"
    assert engine.num_free_blocks == 8


def test_layer_hook_sees_that_layers_kv_already_written(model_dir):
    engine = LLMEngine.from_path(model_dir("qwen2"), num_blocks=4)
    written = []

    def hook(layer, rids):
        data = engine.kv_cache.export_blocks(engine.block_table(rids[0]))
        written.append([bool(data[i].any()) for i in range(engine.layout.num_layers)])

    engine.set_layer_hook(hook)
    prefill(engine, "h", list(range(5, 25)))
    layers = engine.layout.num_layers
    assert written == [[j <= i for j in range(layers)] for i in range(layers)]
    hashes = [full_block_hashes(engine.layout, list(range(5, n))) for n in (25, 21)]
    assert hashes[0] == hashes[1]  # one full block
