"""Structured output through a whole mesh (gateway, scheduler, prefill and decode workers as processes): with the
random-weight tiny model, every response to 20 JSON schemas parses and validates against its schema (HTTP with
`response_format`, and gRPC with `StructuredOutput`); regex, choice, EBNF and json_object outputs match; an invalid
or oversized constraint is a 400 / INVALID_ARGUMENT naming the problem, and the mesh stays healthy.

Every schema bounds its strings, numbers and arrays, so a complete document fits in MAX_TOKENS whatever the
random model prefers (a schema whose shortest document does not fit ends with finish_reason "length")."""

import json
import re

import grpc
import httpx
import openai
import pytest

from mesh import start_mesh
from kvmesh.v1 import common_pb2, gateway_pb2

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

MAX_TOKENS = 160
S = {"type": "string", "maxLength": 6}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}


def obj(properties: dict, required=None) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required}


SCHEMAS = [
    obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"ok": {"type": "boolean"}, "nothing": {"type": "null"}}),
    obj({"digits": {"type": "array", "items": DIGIT, "minItems": 1, "maxItems": 3}}),
    obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 999},
                      "email": {"type": "string", "pattern": "^[a-z]{1,5}@[a-z]{1,5}\\.com$"}})}),
    obj({"p": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"k": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}),
    obj({"points": {"type": "array", "items": obj({"x": DIGIT, "y": DIGIT}), "minItems": 1, "maxItems": 2}}),
    obj({"version": {"const": "v1"}, "n": DIGIT}),
    obj({"either": {"anyOf": [DIGIT, {"type": "string", "maxLength": 3}]}}),
    obj({"a": DIGIT, "b": S, "c": {"type": "boolean"}}, required=["a"]) | {"additionalProperties": False},
    obj({"l1": obj({"l2": obj({"l3": DIGIT})})}),
    {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 2},
    obj({"word": {"type": "string", "minLength": 2, "maxLength": 4}}),
    {"$defs": {"pt": obj({"x": DIGIT})}, "type": "object", "properties": {"p": {"$ref": "#/$defs/pt"},
                                                                         "q": {"$ref": "#/$defs/pt"}},
     "required": ["p", "q"]},
    obj({"maybe": {"type": ["string", "null"], "maxLength": 4}}),
    obj({"level": {"type": "integer", "enum": [1, 2, 3]}, "t": {"type": "number", "minimum": -5, "maximum": 5}}),
    obj({"id": {"type": "string", "pattern": "^[0-9a-f]{4}$"}, "flags": {"type": "array", "items": {"type": "boolean"},
                                                                      "maxItems": 2}}),
]


@pytest.fixture(scope="module")
def mesh(model_dir):
    m = start_mesh(str(model_dir("llama")), prefill=1, decode=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=mesh.http_base, api_key="unused", max_retries=0, timeout=120)


def test_the_test_set_is_twenty_valid_schemas():
    assert len(SCHEMAS) == 20
    for schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_every_json_schema_response_validates_over_http(client, index):
    schema = SCHEMAS[index]
    sampled = index % 2  # half greedy, half sampled (each with its own seed)
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": f"Fill in form {index}."}], max_tokens=MAX_TOKENS,
        temperature=1.0 if sampled else 0.0, seed=index,
        response_format={"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema,
                                                                "strict": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def grpc_generate(mesh, structured: common_pb2.StructuredOutput, prompt="Answer:", **sampling):
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, structured_output=structured,
                                       **sampling)
    responses = list(mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(prompt=prompt, sampling=params),
                                                  timeout=120))
    return "".join(r.text for r in responses), responses[-1].finish_reason


@pytest.mark.parametrize("index", [0, 4, 9, 16])
def test_json_schema_responses_validate_over_grpc(mesh, index):
    text, reason = grpc_generate(mesh, common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMAS[index])),
                                 prompt=f"Record {index}:")
    assert reason == common_pb2.FINISH_REASON_STOP
    jsonschema.validate(json.loads(text), SCHEMAS[index])


def test_regex_choice_and_grammar_outputs_match(mesh, client):
    name = client.models.list().data[0].id
    pattern = r"[A-Z][a-z]{2,5} [0-9]{1,3}"
    regex = client.completions.create(model=name, prompt="Street:", max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"guided_regex": pattern}).choices[0]
    assert re.fullmatch(pattern, regex.text) and regex.finish_reason == "stop"
    choices = ["alpha", "beta", "gamma delta"]
    picked = client.completions.create(model=name, prompt="Pick:", max_tokens=MAX_TOKENS, temperature=1.0, seed=3,
                                       extra_body={"structured_outputs": {"choice": choices}}).choices[0]
    assert picked.text in choices and picked.finish_reason == "stop"
    text, reason = grpc_generate(mesh, common_pb2.StructuredOutput(grammar='root ::= "(" [0-9] ("," [0-9])? ")"'))
    assert re.fullmatch(r"\([0-9](,[0-9])?\)", text) and reason == common_pb2.FINISH_REASON_STOP


def test_json_object_parses(client):
    reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=MAX_TOKENS,
                                           messages=[{"role": "user", "content": "Reply in JSON."}], temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("body, says", [
    ({"guided_json": {"type": "foo"}}, 'Unsupported type "foo"'),
    ({"guided_regex": "a(b"}, "parenthesis is not closed"),
    ({"guided_json": {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 600}
                                                       for i in range(120)}}}, "at most 65536 are accepted"),
])
def test_a_bad_constraint_is_a_400_with_the_reason_and_the_mesh_stays_healthy(mesh, body, says):
    reply = httpx.post(f"{mesh.http_base}/completions", json={"prompt": "hi", "max_tokens": 4, **body}, timeout=60)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert says in message and ".cc:" not in message
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(mesh, common_pb2.StructuredOutput(regex="a(b"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "parenthesis" in info.value.details()
    healthy = httpx.post(f"{mesh.http_base}/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert healthy.status_code == 200
