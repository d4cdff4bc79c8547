"""Structured output in the engine: the grammar masks every sampled token (the prefill worker's first one too),
end-of-sequence comes only where the text is complete, a resumed or handed-over state advances over the tokens
already generated, and a bad constraint is refused with the library's reason and leaves nothing behind."""

import json

import pytest
import torch
from engine_helpers import prompts_of_lengths, run_all

pytest.importorskip("xgrammar")

from kvmesh.services.engine.engine import LLMEngine  # noqa: E402
from kvmesh.services.engine.errors import InvalidRequestError  # noqa: E402
from kvmesh.services.engine.sampler import SamplingParams  # noqa: E402
from kvmesh.services.engine.structured import Constraint, mask_logits  # noqa: E402

PROMPT = prompts_of_lengths([12], vocab_size=700, seed=3)[0]


def constrained(constraint: Constraint, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 40, **kw}, structured=constraint)


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine.from_path(model_dir("llama"), num_blocks=64)


def text_of(engine, params, ids=PROMPT):
    out = run_all(engine, requests={"r": (ids, params)})
    return engine.tokenizer.decode(out["tokens"]["r"], skip_special_tokens=True), out["reasons"]["r"], out


def test_unconstrained_greedy_output_is_not_already_a_choice(engine):
    text, _, _ = text_of(engine, SamplingParams(temperature=0, max_tokens=8))
    assert text not in ("yes", "no", "maybe")  # so the next test shows the mask at work


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choice_output_is_exactly_one_choice_and_stops(engine, temperature):
    choices = ["yes", "no", "maybe"]
    text, reason, _ = text_of(engine, constrained(Constraint.of("choice", choices), temperature=temperature, seed=5))
    assert text in choices and reason == "stop"


def test_json_schema_output_validates_with_ranges_and_enums(engine):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "required": ["n", "c"], "additionalProperties": False, "properties": {
        "n": {"type": "integer", "minimum": 3, "maximum": 7}, "c": {"enum": ["red", "blue"]}}}
    text, reason, _ = text_of(engine, constrained(Constraint("json_schema", json.dumps(schema))))
    assert reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_eos_is_masked_until_the_text_is_complete_then_only_eos(engine):
    grammars, eos = engine.grammars, engine.eos_token_ids[0]
    matcher = grammars.matcher_for(constrained(Constraint("regex", "ab")), PROMPT)
    logits = torch.zeros(1, engine.vocab_size)
    allowed = mask_logits(logits.clone(), [matcher])[0].isfinite()
    assert not allowed[eos] and 0 < int(allowed.sum()) < engine.vocab_size
    for token in engine.tokenizer.encode("ab", add_special_tokens=False):
        assert matcher.accept(token)
    allowed = mask_logits(logits.clone(), [matcher])[0].isfinite()
    assert allowed.nonzero().flatten().tolist() == [eos]


def test_a_state_with_nothing_left_allows_only_eos(engine):
    eos = engine.eos_token_ids[0]
    matcher = engine.grammars.matcher_for(constrained(Constraint("regex", "a")), PROMPT)
    for token in engine.tokenizer.encode("a", add_special_tokens=False) + [eos]:
        assert matcher.accept(token)
    assert matcher.terminated
    allowed = mask_logits(torch.zeros(1, engine.vocab_size), [matcher])[0].isfinite()
    assert allowed.nonzero().flatten().tolist() == [eos]


def test_unconstrained_rows_of_a_batch_are_left_alone(engine):
    matcher = engine.grammars.matcher_for(constrained(Constraint("regex", "a")), PROMPT)
    logits = mask_logits(torch.zeros(2, engine.vocab_size), [None, matcher])
    assert logits[0].isfinite().all() and not logits[1].isfinite().all()


def test_a_complete_output_ends_with_stop_even_with_ignore_eos(engine):
    text, reason, out = text_of(engine, constrained(Constraint.of("choice", ["ok"]), ignore_eos=True))
    assert text == "ok" and reason == "stop"


def test_a_resumed_continuation_advances_over_the_tokens_already_generated(engine):
    done = engine.tokenizer.encode("ab", add_special_tokens=False)
    params = constrained(Constraint("regex", "abc", num_resumed=len(done)))
    text, reason, _ = text_of(engine, params, PROMPT + done)
    assert text == "c" and reason == "stop"
    wrong = engine.tokenizer.encode("x", add_special_tokens=False)
    with pytest.raises(InvalidRequestError, match="resumed token"):
        engine.add_request("bad", PROMPT + wrong, constrained(Constraint("regex", "abc", num_resumed=1)))
    assert not engine.has_unfinished()


def test_prefill_samples_under_the_mask_and_decode_continues_the_state(model_dir):
    path = model_dir("llama")
    pre, dec = LLMEngine.from_path(path, num_blocks=16), LLMEngine.from_path(path, num_blocks=16)
    params = constrained(Constraint("regex", "(xy){2}z"))
    pre.add_request("r", PROMPT, params, prefill_only=True)
    (first,) = run_all(pre)["tokens"]["r"]
    assert pre.tokenizer.decode([first]) in ("x", "xy", "xyx", "xyxy", "xyxyz")
    dec.kv_cache.import_blocks(dec.reserve("r", len(PROMPT)), pre.kv_cache.export_blocks(pre.block_table("r")))
    pre.release("r")
    dec.add_prefilled("r", PROMPT, first, params)
    out = run_all(dec)
    assert dec.tokenizer.decode(out["tokens"]["r"], skip_special_tokens=True) == "xyxyz"
    assert out["reasons"]["r"] == "stop" and dec.num_free_blocks == 16


def test_a_first_token_the_grammar_forbids_is_refused(engine):
    engine.reserve("f", len(PROMPT))
    z = engine.tokenizer.encode("z", add_special_tokens=False)[0]
    with pytest.raises(InvalidRequestError, match="not allowed"):
        engine.add_prefilled("f", PROMPT, z, constrained(Constraint("regex", "a+")))
    engine.release("f")
    assert engine.num_free_blocks == 64


@pytest.mark.parametrize("constraint, reason", [
    (Constraint("json_schema", '{"type": "foo"}'), 'Unsupported type "foo"'),
    (Constraint("json_schema", "{not json"), "Failed to parse JSON"),
    (Constraint("regex", "a(b"), "parenthesis is not closed"),
    (Constraint("grammar", "root ::= "), "grammar is not valid"),
])
def test_an_invalid_constraint_is_refused_with_the_librarys_reason(engine, constraint, reason):
    with pytest.raises(InvalidRequestError, match=reason) as info:
        engine.add_request("x", PROMPT, constrained(constraint))
    assert ".cc:" not in str(info.value) and "/project/" not in str(info.value)
    assert not engine.has_unfinished() and engine.num_free_blocks == 64
