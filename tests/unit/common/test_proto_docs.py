"""Every RPC, message, enum value and field of the mesh's protos carries a comment right above it."""

import re
from pathlib import Path

import pytest

PROTOS = Path(__file__).resolve().parents[3] / "protos" / "kvmesh" / "v1"
DECLARATION = re.compile(r"^\s*(rpc |message |service |enum |(optional |repeated )?[\w.<>, ]+ \w+ = \d+;)")


@pytest.mark.parametrize("name", ["gateway.proto", "scheduler.proto", "cache.proto"])
def test_every_declaration_is_commented(name):
    lines = (PROTOS / name).read_text().splitlines()
    missing = [line.strip() for i, line in enumerate(lines)
               if DECLARATION.match(line) and "_UNSPECIFIED = 0" not in line
               and not lines[i - 1].strip().startswith("//")]
    assert missing == []


def test_the_gateway_contract_keeps_its_names():
    from kvmesh.v1 import gateway_pb2

    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {"Generate": ("GenerateRequest", "GenerateResponse", True),
                       "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
                       "ListModels": ("ListModelsRequest", "ListModelsResponse", False)}
    request = gateway_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    assert {"prompt", "prompt_token_ids", "sampling", "request_id", "model", "cache_salt"} <= set(request)
    response = gateway_pb2.GenerateResponse.DESCRIPTOR.fields_by_name
    assert {"token_ids", "text", "finish_reason", "usage", "logprobs"} <= set(response)
