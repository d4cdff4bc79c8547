"""Gemma 2 and Gemma 3 (text) against transformers' own, on the same weights: every attention path of a step
(prefill from 0, chunked prefill over the paged cache, batched decode in float32 and bfloat16), past the
16-token sliding window of the tiny presets."""

import pytest
import torch
from engine_helpers import prompts_of_lengths, run_all

from kvmesh.services.engine.batch import Chunk, build_batch
from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.errors import UnsupportedModelError
from kvmesh.services.engine.gemma import GemmaModel
from kvmesh.services.engine.kv_cache import KVCache
from kvmesh.services.engine.loader import model_class
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.kv_identity import KVLayout

GEMMA = ["gemma2", "gemma3"]
BF16_TOL = 0.1  # as test_engine_parity: HF's own bfloat16 logits are ~0.09 off its float32 ones


def _pool(model, num_blocks=64):
    c = model.config
    layout = KVLayout("t", str(model.dtype).removeprefix("torch."), 16, c.num_layers, c.num_kv_heads, c.head_dim)
    return KVCache(layout, num_blocks)


def prefill_logits(path, ids, splits=(), dtype="auto"):
    """Logits of every position of `ids`, prefilled in chunks cut at `splits`, over descending blocks."""
    model = GemmaModel.from_path(path, dtype)
    kv = _pool(model)
    table = list(range(63, 63 - 1 - len(ids) // 16, -1))
    cuts = [0, *splits, len(ids)]
    return torch.cat([model.forward(build_batch([Chunk(ids[a:b], a, table)], 16, all_logits=True), kv)
                      for a, b in zip(cuts, cuts[1:])])


def decode_logits(path, prompts, continuations, dtype="auto"):
    """Prefill each prompt, then teacher-force the continuations one token per step, all sequences in one
    decode batch: per sequence, the logits of its last prompt token's successors [steps, vocab]."""
    model = GemmaModel.from_path(path, dtype)
    kv = _pool(model)
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    for ids, table in zip(prompts, tables):
        model.forward(build_batch([Chunk(ids, 0, table)], 16), kv)
    out = [[] for _ in prompts]
    for step in range(len(continuations[0])):
        chunks = [Chunk([c[step]], len(p) + step, t) for p, c, t in zip(prompts, continuations, tables)]
        batch = build_batch(chunks, 16, group_cost=model.decode_group_cost)
        logits = model.forward(batch, kv)
        for i, row in enumerate(batch.chunk_rows):
            out[i].append(logits[row])
    return [torch.stack(rows) for rows in out]


@pytest.mark.parametrize("family", GEMMA)
def test_prefill_and_chunked_prefill_match_transformers_past_the_window(model_dir, hf_model, family):
    path = model_dir(family)
    assert model_class(path) is GemmaModel
    ids = prompts_of_lengths([77])[0]
    ref = hf_model(path)(torch.tensor([ids])).logits[0]
    assert (prefill_logits(path, ids) - ref).abs().max().item() <= 1e-4
    # chunks that start inside, at, and far past the window's reach over the paged cache
    assert (prefill_logits(path, ids, splits=(5, 16, 30, 61)) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", GEMMA)
def test_batched_decode_matches_transformers(model_dir, hf_model, family):
    path = model_dir(family)
    prompts = prompts_of_lengths([3, 14, 29, 50], seed=7)
    continuations = prompts_of_lengths([9] * 4, seed=8)
    got = decode_logits(path, prompts, continuations)
    hf = hf_model(path)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        ref = hf(torch.tensor([p + c])).logits[0, len(p):]
        assert (got[i] - ref).abs().max().item() <= 1e-4, f"sequence {i}"


@pytest.mark.parametrize("family", GEMMA)
def test_bfloat16_decode_within_held_tolerance(model_dir, hf_model, family):
    path = model_dir(family)
    prompts = prompts_of_lengths([6, 40], seed=9)
    continuations = prompts_of_lengths([6, 6], seed=10)
    got = decode_logits(path, prompts, continuations, "bfloat16")
    hf = hf_model(path, torch.bfloat16)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        ref = hf(torch.tensor([p + c])).logits[0, len(p):].float()
        assert got[i].dtype == torch.bfloat16
        assert (got[i].float() - ref).abs().max().item() <= BF16_TOL, f"sequence {i}"


@pytest.mark.parametrize("family", GEMMA)
def test_greedy_batch_equals_hf_generate(model_dir, hf_model, family):
    path = model_dir(family)
    hf = hf_model(path)
    prompts = prompts_of_lengths([3, 9, 17, 30, 1, 45], seed=2)
    # a small token budget forces chunked prefill next to running decodes
    engine = LLMEngine.from_path(path, max_num_batched_tokens=40, num_blocks=48)
    params = SamplingParams(temperature=0, max_tokens=24)
    got = run_all(engine, {str(i): i * 2 for i in range(6)},
                  {str(i): (p, params) for i, p in enumerate(prompts)})["tokens"]
    assert sum(len(t) for t in got.values()) > 6 * 12  # mostly full-length outputs, not early EOS
    for i, prompt in enumerate(prompts):
        want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24)[0, len(prompt):].tolist()
        assert got[str(i)] == want, f"prompt {i}"
    assert engine.num_free_blocks == 48


# Each setting the presets exercise, switched off: transformers' logits move, so the parity above tests it.
SWITCHED_OFF = {
    "gemma2": {"sliding_window": 4096, "attn_logit_softcapping": None, "final_logit_softcapping": None},
    "gemma3": {"sliding_window": 4096, "query_pre_attn_scalar": 32},
}


@pytest.mark.parametrize("family", GEMMA)
def test_window_softcaps_and_scale_each_change_the_logits(model_dir, variant_dir, hf_model, family):
    ids = prompts_of_lengths([60], seed=11)[0]
    ref = hf_model(model_dir(family))(torch.tensor([ids])).logits[0]
    for key, value in SWITCHED_OFF[family].items():
        path = variant_dir(family, f"{family}-{key}", **{key: value})
        other = hf_model(path)(torch.tensor([ids])).logits[0]
        assert (other - ref).abs().max().item() > 1e-2, key
        assert (prefill_logits(path, ids, splits=(20,)) - other).abs().max().item() <= 1e-4, key


def test_gemma_kv_layouts_differ_from_every_other_family(model_dir, variant_dir):
    layouts = {f: LLMEngine.from_path(model_dir(f), num_blocks=4).layout
               for f in ("llama", "qwen2", "mistral", *GEMMA)}
    assert len(set(layouts.values())) == len(layouts)
    # the same weights with another window must not share KV blocks either
    other = LLMEngine.from_path(variant_dir("gemma2", "gemma2-window-32", sliding_window=32), num_blocks=4).layout
    assert other.model_id != layouts["gemma2"].model_id


@pytest.mark.parametrize("overrides, words", [
    ({"hidden_activation": "gelu"}, "activation 'gelu'"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"attention_bias": True}, "attention_bias"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "sliding_attention"]},
     "layer_types"),
])
def test_unsupported_gemma_variants_are_refused_with_a_reason(variant_dir, overrides, words):
    path = variant_dir("gemma3", f"refused-{'-'.join(overrides)}", **overrides)
    with pytest.raises(UnsupportedModelError, match=words):
        GemmaModel.from_path(path)


def test_local_layers_read_only_the_blocks_their_window_reaches():
    from kvmesh.services.engine.gemma_attention import step_masks

    tables = [list(range(10, 15)), list(range(20, 25))]
    chunks = [Chunk([7], 70, tables[0]), Chunk([7], 40, tables[1]), Chunk([7] * 9, 55, list(range(30, 35)))]
    batch = build_batch(chunks, 16)
    (blocks, mask), = step_masks(batch, 16, 16).decode
    # positions 40 and 70 see 25..40 and 55..70: two blocks each (of 3 and 5), not the padded context
    assert blocks.tolist() == [21, 22, 13, 14] and mask.shape == (2, 32)
    assert mask.sum(1).tolist() == [16, 16]
    (prefill_blocks, prefill_mask), = step_masks(batch, 16, 16).prefill
    assert prefill_blocks.tolist() == [32, 33] and prefill_mask.shape == (9, 64 - 32)  # from block 2: 40..63
    (full_blocks, full_mask), = step_masks(batch, None, 16).decode
    assert full_blocks.numel() == 2 * 5 and full_mask.sum(1).tolist() == [41, 71]


# config.json as transformers 4 wrote it (and as most Gemma checkpoints on the Hub still read)
OLD_STYLE = {
    "gemma2": {"rope_parameters": None, "rope_theta": 10000.0, "layer_types": None},
    "gemma3": {"rope_parameters": None, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
               "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "layer_types": None,
               "sliding_window_pattern": 3},
}


@pytest.mark.parametrize("family", GEMMA)
def test_transformers_4_configs_give_the_same_model(model_dir, variant_dir, hf_model, family):
    path = variant_dir(family, f"{family}-old-style", **OLD_STYLE[family])
    ids = prompts_of_lengths([50], seed=12)[0]
    ref = hf_model(model_dir(family))(torch.tensor([ids])).logits[0]
    assert (hf_model(path)(torch.tensor([ids])).logits[0] - ref).abs().max().item() <= 1e-5  # HF reads it alike
    assert GemmaModel.from_path(path).spec == GemmaModel.from_path(model_dir(family)).spec
    assert (prefill_logits(path, ids, splits=(33,)) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", GEMMA)
def test_model_init_command_makes_each_gemma_family(tmp_path, family):
    from kvmesh.services.cli import main

    assert main(["model", "init", str(tmp_path / family), "--family", family]) == 0
    model = GemmaModel.from_path(tmp_path / family)
    assert model.config.architecture == {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[family]
    assert model.spec.sliding_window == 16 and any(model.spec.sliding_layers)
    assert not all(model.spec.sliding_layers)
