"""The `priority` field (vLLM's: an integer, lower is more urgent, default 0) at the gateway: the OpenAI body's
extra field and the gRPC SamplingParams field, range-checked with a message naming it."""

import pytest
from pydantic import ValidationError

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.services.gateway.openai_schema import CompletionRequest
from kvmesh.services.gateway.sampling_checks import MAX_PRIORITY, check_sampling_extras
from kvmesh.v1 import common_pb2


def test_the_http_priority_reaches_the_sampling_params():
    assert CompletionRequest(prompt="hi", priority=-3).sampling().priority == -3
    assert CompletionRequest(prompt="hi").sampling().priority == 0


@pytest.mark.parametrize("value", ["high", 1.5, True, MAX_PRIORITY + 1, None])
def test_a_priority_that_is_not_a_bounded_integer_is_refused(value):
    with pytest.raises(ValidationError, match="priority"):
        CompletionRequest(prompt="hi", priority=value)


def test_a_grpc_priority_out_of_range_is_refused_naming_the_field():
    check_sampling_extras(common_pb2.SamplingParams(priority=MAX_PRIORITY), vocab_size=10)
    with pytest.raises(InvalidArgumentError, match=r"priority must be an integer in \[-1000000, 1000000\]"):
        check_sampling_extras(common_pb2.SamplingParams(priority=-MAX_PRIORITY - 1), vocab_size=10)
