"""A request that fails after its first message ends with an explicit error on every API, never a quiet end:
the gateway against an in-process scheduler and decode worker whose streams end every way a stream can end."""

import asyncio
import json

import grpc
import httpx
import pytest

from kvmesh.services.common import errors, metrics
from kvmesh.services.common.channels import ChannelCache
from kvmesh.services.gateway.core import Gateway, GenerateCall, ModelCard
from kvmesh.services.gateway.openai_api import OpenAIFrontend, build_app
from kvmesh.services.gateway.tokens import AsyncTokenizer
from kvmesh.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc)

CARD = ModelCard("tiny", "/models/tiny", max_model_len=64, vocab_size=100, model_id="tiny-0")
FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "abort": common_pb2.FINISH_REASON_ABORT}

# what the fake decode worker does, chosen by the prompt's first token id
COMPLETE, SILENT_END, DIES, ABORTED, SLOW, STOPPING = 1, 2, 3, 4, 5, 6


class CharTokenizer:
    """One token per character (ids mod 100), so a prompt's first character picks the decode worker's behaviour."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 100 for c in text]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


class FakeMesh(scheduler_pb2_grpc.SchedulerServicer, decode_pb2_grpc.DecodeServicer):
    """Scheduler and decode worker in one: Route sends every request to itself; Generate sends one token, then
    ends as the prompt's first token id says."""

    address = ""

    async def Route(self, request, context):
        return scheduler_pb2.RouteResponse(decode=scheduler_pb2.WorkerInfo(worker_id="d0", address=self.address))

    async def Generate(self, request, context):
        behaviour = request.prompt_token_ids[0]
        yield decode_pb2.DecodeResponse(token_ids=[7], text="a")
        if behaviour == COMPLETE:
            yield decode_pb2.DecodeResponse(token_ids=[8], text="b", finish_reason=FINISH["stop"],
                                            usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=2))
        elif behaviour == DIES:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer")
        elif behaviour == ABORTED:
            yield decode_pb2.DecodeResponse(finish_reason=FINISH["abort"])
        elif behaviour == STOPPING:  # what a worker's server does to its streams when its grace period ends
            await context.abort(grpc.StatusCode.CANCELLED, "server shutting down")
        elif behaviour == SLOW:
            await asyncio.sleep(60)
        # SILENT_END: the stream just stops, with no final message


async def with_gateway(test):
    """Run test(gateway) against a FakeMesh served on a free port."""
    fake = FakeMesh()
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, server)
    decode_pb2_grpc.add_DecodeServicer_to_server(fake, server)
    fake.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    channels = ChannelCache()
    try:
        return await test(Gateway(CARD, fake.address, channels))
    finally:
        await channels.close()
        await server.stop(0)


def failures(api: str, stage: str, code: str) -> float:
    value = metrics.REGISTRY.get_sample_value("kvmesh:request_failures_total",
                                              {"api": api, "stage": stage, "code": code})
    return value or 0.0


async def collect(gateway: Gateway, behaviour: int) -> list:
    call = GenerateCall([behaviour, 9], common_pb2.SamplingParams(max_tokens=4))
    return [r async for r in gateway.generate(call, timeout=10)]


def test_a_complete_stream_is_relayed_whole():
    got = asyncio.run(with_gateway(lambda gateway: collect(gateway, COMPLETE)))
    assert [list(r.token_ids) for r in got] == [[7], [8]] and got[-1].finish_reason == FINISH["stop"]


@pytest.mark.parametrize("behaviour, code, words", [
    (SILENT_END, grpc.StatusCode.UNAVAILABLE, "before its last token"),
    (DIES, grpc.StatusCode.UNAVAILABLE, "connection to it failed"),  # the transport's own text stays internal
    (ABORTED, grpc.StatusCode.UNAVAILABLE, "aborted"),
    (STOPPING, grpc.StatusCode.UNAVAILABLE, "shutting down"),  # not CANCELLED: the client did not cancel
])
def test_a_stream_that_ends_without_its_final_message_raises_and_is_counted(behaviour, code, words):
    before = failures("rpc", "after_first_token", code.name)
    seen = []

    async def run(gateway):
        call = GenerateCall([behaviour, 9], common_pb2.SamplingParams(max_tokens=4))
        with pytest.raises(errors.MeshError) as caught:
            async for response in gateway.generate(call, timeout=10):
                seen.append(response)
        return caught.value

    error = asyncio.run(with_gateway(run))
    assert errors.status_for(error) == code and words in str(error)
    assert "reset by peer" not in str(error)  # a transport's own text never reaches the client
    assert "decode worker 127.0.0.1:" in str(error)  # the message names the worker
    assert [list(r.token_ids) for r in seen] == [[7]]  # the token before the failure still went out
    assert failures("rpc", "after_first_token", code.name) == before + 1


def test_a_failure_before_the_first_token_is_counted_at_its_stage():
    before = failures("http", "before_first_token", "UNAVAILABLE")

    async def run(_gateway):
        gateway = Gateway(CARD, "127.0.0.1:1", ChannelCache(), route_timeout_s=2)  # no scheduler there
        call = GenerateCall([COMPLETE], common_pb2.SamplingParams(max_tokens=4), api="http")
        with pytest.raises(errors.MeshError):
            [r async for r in gateway.generate(call, timeout=10)]
        await gateway.channels.close()

    asyncio.run(with_gateway(run))
    assert failures("http", "before_first_token", "UNAVAILABLE") == before + 1


async def post(gateway: Gateway, body: dict) -> httpx.Response:
    app = build_app(OpenAIFrontend(gateway, AsyncTokenizer(CharTokenizer())), None, max_body_bytes=1 << 20)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        return await client.post("/v1/completions", json=body, timeout=30)


def events(reply: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("prompt", [chr(SILENT_END), chr(DIES), chr(ABORTED)])
def test_a_failed_sse_stream_ends_with_an_openai_error_event_and_no_done(prompt):
    reply = asyncio.run(with_gateway(lambda g: post(g, {"prompt": prompt + "x", "max_tokens": 4, "stream": True})))
    assert reply.status_code == 200  # the headers went out with the first token
    data = events(reply)
    assert "[DONE]" not in data
    last = json.loads(data[-1])
    assert set(last) == {"error"} and last["error"]["code"] == 503 and last["error"]["type"] == "server_error"
    assert "decode worker" in last["error"]["message"]
    assert json.loads(data[0])["choices"][0]["text"] == "a"  # the token before the failure


def test_a_complete_sse_stream_still_ends_with_done():
    reply = asyncio.run(with_gateway(lambda g: post(g, {"prompt": chr(COMPLETE) + "x", "max_tokens": 4,
                                                        "stream": True})))
    assert events(reply)[-1] == "[DONE]"


@pytest.mark.parametrize("prompt", [chr(SILENT_END), chr(DIES), chr(ABORTED)])
def test_a_failed_non_streaming_request_gets_503_with_a_message_never_an_empty_200(prompt):
    reply = asyncio.run(with_gateway(lambda g: post(g, {"prompt": prompt + "x", "max_tokens": 4})))
    assert reply.status_code == 503, reply.text
    assert "decode worker" in reply.json()["error"]["message"]


def test_drain_refuses_new_requests_and_ends_a_stream_past_the_grace_period_with_unavailable():
    async def run(gateway):
        call = GenerateCall([SLOW, 9], common_pb2.SamplingParams(max_tokens=4))
        stream = gateway.generate(call, timeout=30)
        first = await stream.__anext__()  # in flight: one token out, the decode worker now silent
        drained = asyncio.create_task(gateway.drain.drain(grace_s=0.3))
        await asyncio.sleep(0)
        with pytest.raises(errors.UnavailableError, match="shutting down"):  # a new request: refused at once
            await collect(gateway, COMPLETE)
        with pytest.raises(errors.UnavailableError, match="shutting down"):  # the late one: ended explicitly
            await stream.__anext__()
        return first, await drained, len(gateway.drain)

    first, ended, live = asyncio.run(with_gateway(run))
    assert list(first.token_ids) == [7] and ended == 1 and live == 0


def test_drain_lets_a_stream_that_finishes_within_the_grace_period_complete():
    async def run(gateway):
        got = asyncio.create_task(collect(gateway, COMPLETE))
        await asyncio.sleep(0)
        ended = await gateway.drain.drain(grace_s=10)
        return await got, ended

    got, ended = asyncio.run(with_gateway(run))
    assert got[-1].finish_reason == FINISH["stop"] and ended == 0
