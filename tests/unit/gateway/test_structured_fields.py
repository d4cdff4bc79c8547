"""Structured output at the gateway's edge: every OpenAI and vLLM field that asks for it becomes one
StructuredOutput in the sampling params the workers get; malformed, oversized or conflicting asks are a 400 naming
the field, before any worker is involved."""

import json

import pytest

from test_openai_honest import ScriptedGateway, post

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.services.gateway.structured import MAX_REGEX_CHARS, requested

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("fields, kind, value", [
    ({"response_format": {"type": "json_object"}}, "json_object", True),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     "json_schema", SCHEMA),
    ({"guided_json": SCHEMA}, "json_schema", SCHEMA),
    ({"guided_json": json.dumps(SCHEMA)}, "json_schema", SCHEMA),
    ({"guided_regex": "[a-z]+"}, "regex", "[a-z]+"),
    ({"guided_choice": ["yes", "no"]}, "choice", ["yes", "no"]),
    ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
    ({"structured_outputs": {"json": SCHEMA}}, "json_schema", SCHEMA),
    ({"structured_outputs": {"regex": "a|b"}}, "regex", "a|b"),
    ({"structured_outputs": {"choice": ["x"]}}, "choice", ["x"]),
    ({"structured_outputs": {"json_object": True}}, "json_object", True),
])
def test_each_field_becomes_one_constraint(fields, kind, value):
    out = requested(fields)
    assert out.WhichOneof("kind") == kind
    got = getattr(out, kind)
    if kind == "json_schema":
        got = json.loads(got)
    elif kind == "choice":
        got = list(got.choices)
    assert got == value


def test_text_and_absent_ask_for_nothing():
    assert requested({}) is None
    assert requested({"response_format": {"type": "text"}}) is None


@pytest.mark.parametrize("fields, named", [
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": "json"}, "response_format"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": [1, 2]}, "guided_json"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_regex": "a" * (MAX_REGEX_CHARS + 1)}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 3]}, "guided_choice"),
    ({"structured_outputs": "json"}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex, guided_choice"),
])
def test_malformed_or_conflicting_asks_are_refused_naming_the_field(fields, named):
    with pytest.raises(InvalidArgumentError, match=named):
        requested(fields)


def test_the_constraint_reaches_every_candidates_sampling_params():
    gateway = ScriptedGateway()
    body = {"prompt": "hi", "n": 2, "seed": 1, "guided_choice": ["yes", "no"]}
    assert post("/v1/completions", body, gateway).status_code == 200
    assert len(gateway.calls) == 2
    for call in gateway.calls:
        assert list(call.sampling.structured_output.choice.choices) == ["yes", "no"]


def test_a_conflict_is_a_400_over_http():
    reply = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "response_format": {"type": "json_object"}, "guided_regex": "a"})
    assert reply.status_code == 400
    assert "only one structured output constraint" in reply.json()["error"]["message"]
