"""The gateway raises the typed errors every service raises; the HTTP API maps them with one table, and answers
with the same messages and the statuses it always has."""

import asyncio

import grpc
import httpx
import pytest

from kvmesh.services.common import errors
from kvmesh.services.engine import errors as engine_errors
from kvmesh.services.gateway.core import Gateway, GenerateCall, ModelCard, validate
from kvmesh.services.gateway.openai_api import OpenAIFrontend, build_app
from kvmesh.services.gateway.openai_errors import http_status, stream_error_event, typed_error_response
from kvmesh.services.gateway.tokens import AsyncTokenizer
from kvmesh.v1 import common_pb2

CARD = ModelCard("tiny", "/models/tiny", max_model_len=64, vocab_size=100, model_id="tiny-0")


class CharTokenizer:
    """A stand-in tokenizer: one token per character; a chat template that refuses a 'robot' role."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 100 for c in text]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        if any(m["role"] == "robot" for m in messages):
            raise ValueError("unknown role robot")
        return "".join(m["content"] for m in messages)


@pytest.mark.parametrize("exc, status", [
    (errors.InvalidArgumentError("x"), 400),
    (errors.NotFoundError("x"), 404),
    (errors.CapacityError("x"), 429),
    (errors.UnavailableError("x"), 503),
    (errors.DeadlineError("x"), 504),
    (errors.ChecksumError("x"), 502),
    (errors.MeshError.with_status(grpc.StatusCode.UNAVAILABLE, "routing failed: no decode worker"), 503),
    (engine_errors.OutOfBlocksError("x"), 429),
    (RuntimeError("bug"), 500),
])
def test_http_status_follows_the_grpc_status_of_the_typed_error(exc, status):
    assert http_status(exc) == status


def test_a_stream_error_event_carries_the_message_and_http_status():
    event = stream_error_event(errors.MeshError.with_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "pool full"))
    assert event == {"error": {"message": "pool full", "type": "server_error", "code": 429}}


@pytest.mark.parametrize("ids, sampling, words", [
    ([], {}, "empty"),
    ([1, 200], {}, "outside the vocabulary"),
    ([1, 2], {"max_tokens": 0}, "max_tokens"),
    ([1, 2], {"max_tokens": 63}, "context"),
    ([1, 2], {"temperature": -1}, "temperature"),
])
def test_validation_raises_the_common_invalid_argument_error(ids, sampling, words):
    with pytest.raises(errors.InvalidArgumentError, match=words) as caught:
        validate(GenerateCall(ids, common_pb2.SamplingParams(**sampling)), CARD)
    assert errors.status_for(caught.value) == grpc.StatusCode.INVALID_ARGUMENT


def post(path: str, body: dict) -> httpx.Response:
    """POST to a gateway HTTP app whose scheduler is never reached (every case fails before routing)."""
    gateway = Gateway(CARD, "127.0.0.1:1", channels=None)
    app = build_app(OpenAIFrontend(gateway, AsyncTokenizer(CharTokenizer())), None, max_body_bytes=1 << 20)

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            return await client.post(path, json=body)

    return asyncio.run(send())


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-17"}, 404, "not served here"),
    ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo with logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "chat template"),
])
def test_http_errors_keep_their_status_message_and_openai_shape(path, body, status, words):
    reply = post(path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["code"] == status
    assert error["type"] == "invalid_request_error"


def test_a_429_says_when_to_come_back():
    peer = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                grpc.aio.Metadata(("retry-after", "4")), "queues full")
    passed_on = errors.MeshError.with_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "routing failed: queues full")
    passed_on.__cause__ = peer
    assert typed_error_response(passed_on).headers["Retry-After"] == "4"  # the scheduler's hint, passed on
    assert typed_error_response(errors.CapacityError("x", retry_after_s=2.2)).headers["Retry-After"] == "3"
    assert typed_error_response(errors.CapacityError("x")).headers["Retry-After"] == "1"
    assert "Retry-After" not in typed_error_response(errors.UnavailableError("x")).headers
