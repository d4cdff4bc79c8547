"""The gateway compiles a request's constraint before routing it, off the event loop and within a bound: an invalid
one is INVALID_ARGUMENT with the library's reason, one that compiles too slowly is refused as too complex, and a
gateway without xgrammar refuses naming the extra to install."""

import asyncio
import json
import sys

import pytest

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.services.gateway.structured import GrammarCheck
from kvmesh.v1 import common_pb2

pytest.importorskip("xgrammar")


def sampling(**structured) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(structured_output=common_pb2.StructuredOutput(**structured))


def check(model_dir, params, timeout_s=30.0):
    grammar_check = GrammarCheck(str(model_dir("llama")), 1024, timeout_s)

    async def run():
        try:
            await grammar_check.check(params)
        finally:
            await grammar_check.close()
    asyncio.run(run())


def test_a_valid_constraint_and_none_pass(model_dir):
    check(model_dir, sampling(json_schema=json.dumps({"type": "object"})))
    check(model_dir, common_pb2.SamplingParams())


@pytest.mark.parametrize("structured, reason", [
    ({"json_schema": '{"type": "foo"}'}, 'json_schema is not valid: Unsupported type "foo"'),
    ({"regex": "[a-"}, "regex is not valid"),
    ({"grammar": "root ::= missing_rule"}, "grammar is not valid"),
    ({}, "structured output kind"),
])
def test_an_invalid_constraint_is_invalid_argument_with_the_reason(model_dir, structured, reason):
    with pytest.raises(InvalidArgumentError, match=reason):
        check(model_dir, sampling(**structured))


def test_a_compile_over_the_bound_is_refused_as_too_complex(model_dir):
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "^[a-z]{1,40}$"}
                                               for i in range(40)}}
    with pytest.raises(InvalidArgumentError, match="too complex: compiling it took longer than 1e-06 s"):
        check(model_dir, sampling(json_schema=json.dumps(schema)), timeout_s=1e-6)


def test_without_xgrammar_the_refusal_names_the_extra(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now raises ImportError
    with pytest.raises(InvalidArgumentError, match=r"kvmesh\[structured\]"):
        check(model_dir, sampling(regex="a"))
