"""The OpenAI API is honest about every field: what it implements reaches the engine (best_of, echo, penalties),
what it does not is refused with a 400 naming the field, and no malformed input gets past the schema."""

import asyncio
import json

import httpx
import pytest

from kvmesh.services.common.errors import CapacityError
from kvmesh.services.gateway.core import ModelCard
from kvmesh.services.gateway.drain import Drain
from kvmesh.services.gateway.openai_api import OpenAIFrontend, build_app
from kvmesh.services.gateway.request_ids import LiveIds
from kvmesh.services.gateway.tokens import AsyncTokenizer
from kvmesh.v1 import common_pb2, decode_pb2

CARD = ModelCard("tiny", "/models/tiny", max_model_len=64, vocab_size=100, model_id="tiny-0")
LIMIT = 4096


class CharTokenizer:
    """One token per character (its code point mod 100)."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 100 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + i % 90) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [chr(32 + i % 90) for i in ids]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)


class ScriptedGateway:
    """Candidate with seed s answers the text f"<s>" with per-token logprobs -|s - 1| (seed 1 is the best); it
    records every call; `hold` makes calls wait; `refuse` makes them fail at routing."""

    card = CARD

    def __init__(self, refuse: Exception | None = None):
        self.calls, self.refuse, self.hold = [], refuse, None
        self.drain, self.live_ids = Drain(), LiveIds()

    async def generate(self, call, timeout=None):
        self.calls.append(call)
        if self.refuse is not None:
            raise self.refuse
        if self.hold is not None:
            await self.hold.wait()
        s = call.sampling.seed
        entries = [common_pb2.TokenLogprob(token_id=5, logprob=-abs(s - 1))] * 2
        yield decode_pb2.DecodeResponse(token_ids=[5, 5], text=f"<{s}>", logprobs=entries,
                                        finish_reason=common_pb2.FINISH_REASON_LENGTH,
                                        usage=common_pb2.Usage(prompt_tokens=2, completion_tokens=2))


def app_of(gateway):
    return build_app(OpenAIFrontend(gateway, AsyncTokenizer(CharTokenizer())), None, max_body_bytes=LIMIT)


async def request(app, method, path, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.request(method, path, **kwargs)


def post(path, body, gateway=None, **kwargs) -> httpx.Response:
    gateway = gateway or ScriptedGateway()
    if isinstance(body, dict):
        kwargs["content"] = json.dumps(body)
    return asyncio.run(request(app_of(gateway), "POST", path, headers={"content-type": "application/json"},
                               **kwargs))


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "audio", {"voice": "alloy"}),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "response_format", {"type": "structural_tag"}),
    ("/v1/completions", "suffix", "the end"),
    ("/v1/completions", "guided_whitespace_pattern", "[ ]*"),
    ("/v1/completions", "prompt_logprobs", 1),
])
def test_unsupported_fields_are_refused_naming_them(path, field, value):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    reply = post(path, {**body, field: value})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"].startswith(field)


def test_values_that_ask_for_nothing_are_accepted():
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "some_client_extra": 1}
    assert post("/v1/chat/completions", body).status_code == 200


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 2**31), ("max_tokens", -1), ("seed", 2**70), ("seed", -1), ("n", 0), ("n", 17),
    ("best_of", 99), ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", 0),
    ("top_k", 2**40), ("presence_penalty", 3), ("frequency_penalty", float("-inf")),
    ("repetition_penalty", 0), ("logit_bias", {"abc": 1}), ("logit_bias", {"5": 200}),
    ("logit_bias", {str(2**40): 1}), ("logprobs", 21), ("stop_token_ids", [2**40]), ("prompt", [2**40]),
])
def test_numbers_out_of_range_get_400_naming_the_field(field, value):
    gateway = ScriptedGateway()
    reply = post("/v1/completions", {"prompt": "hi", field: value}, gateway)
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["error"]["message"]
    assert not gateway.calls  # refused before anything was routed


def test_penalties_and_bias_reach_the_sampling_params():
    gateway = ScriptedGateway()
    body = {"prompt": "hi", "presence_penalty": 0.5, "frequency_penalty": -1.0, "repetition_penalty": 1.3,
            "logit_bias": {"7": -100, "9": 2.5}}
    assert post("/v1/completions", body, gateway).status_code == 200
    s = gateway.calls[0].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, pytest.approx(1.3))
    assert dict(s.logit_bias) == {7: -100.0, 9: 2.5}


def test_lone_surrogates_are_refused():
    for path, raw in [("/v1/completions", '{"prompt": "a\\ud800b"}'),
                      ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}')]:
        reply = post(path, None, content=raw)
        assert reply.status_code == 400 and "Unicode" in reply.json()["error"]["message"], reply.text


def test_a_chunked_body_over_the_limit_gets_413():
    async def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000  # 10 kB in chunks, no Content-Length: only the bytes read can tell
        yield b'"}'

    gateway = ScriptedGateway()
    reply = post("/v1/completions", None, gateway, content=chunks())
    assert reply.status_code == 413 and "exceeds the limit" in reply.text
    assert not gateway.calls


def test_best_of_returns_the_candidate_with_the_highest_cumulative_logprob():
    gateway = ScriptedGateway()
    reply = post("/v1/completions", {"prompt": "hi", "best_of": 3, "n": 1, "seed": 0}, gateway)
    assert len(gateway.calls) == 3  # three candidates ran, seeds 0, 1, 2
    assert sorted(c.sampling.seed for c in gateway.calls) == [0, 1, 2]
    choices = reply.json()["choices"]
    assert [c["text"] for c in choices] == ["<1>"] and choices[0]["index"] == 0
    assert choices[0]["logprobs"] is None  # asked for only to rank: not returned
    two = post("/v1/completions", {"prompt": "hi", "best_of": 3, "n": 2, "seed": 0, "logprobs": 0}).json()
    assert [c["text"] for c in two["choices"]] == ["<1>", "<0>"] or \
        [c["text"] for c in two["choices"]] == ["<1>", "<2>"]
    assert two["choices"][0]["logprobs"]["token_logprobs"] == [0, 0]


def test_best_of_with_stream_is_refused():
    reply = post("/v1/completions", {"prompt": "hi", "best_of": 2, "stream": True})
    assert reply.status_code == 400 and "best_of" in reply.json()["error"]["message"]


def test_echo_prepends_the_prompt_whole_and_streamed():
    whole = post("/v1/completions", {"prompt": "Hello", "echo": True, "seed": 4}).json()
    assert whole["choices"][0]["text"] == "Hello<4>"
    streamed = post("/v1/completions", {"prompt": "Hello", "echo": True, "seed": 4, "stream": True}).text
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in streamed.splitlines()
             if line.startswith("data: {")]
    assert "".join(texts) == "Hello<4>" and texts[0] == "Hello"
    ids = post("/v1/completions", {"prompt": [40, 41], "echo": True, "seed": 4}).json()
    assert ids["choices"][0]["text"] == CharTokenizer().decode([40, 41]) + "<4>"


def test_a_refused_stream_gets_its_real_status_before_any_event():
    gateway = ScriptedGateway(refuse=CapacityError("all queues full", retry_after_s=2))
    reply = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, gateway)
    assert reply.status_code == 429 and reply.headers["Retry-After"] == "2"
    assert reply.json()["error"]["message"] == "all queues full"
    assert not gateway.live_ids  # its request id was given back


def test_a_duplicate_request_id_in_flight_gets_409_and_is_free_again_after():
    async def scenario():
        gateway = ScriptedGateway()
        gateway.hold = asyncio.Event()
        app = app_of(gateway)
        body = {"prompt": "hi", "request_id": "mine"}
        first = asyncio.create_task(request(app, "POST", "/v1/completions", json=body))
        while not gateway.calls:
            await asyncio.sleep(0.01)
        second = await request(app, "POST", "/v1/completions", json=body)
        gateway.hold.set()
        third = await request(app, "POST", "/v1/completions", json=body)
        return (await first), second, third, gateway

    first, second, third, gateway = asyncio.run(scenario())
    assert first.status_code == 200 and third.status_code == 200
    assert second.status_code == 409 and "already in flight" in second.json()["error"]["message"]
    assert not gateway.live_ids


def test_tokenize_and_detokenize_as_vllm_has_them():
    reply = post("/tokenize", {"prompt": "abc", "return_token_strs": True}).json()
    assert reply["tokens"] == CharTokenizer().encode("abc") and reply["count"] == 3
    assert reply["max_model_len"] == CARD.max_model_len and len(reply["token_strs"]) == 3
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "hey"}]}).json()
    assert chat["count"] == 3 and chat["token_strs"] is None
    assert post("/detokenize", {"tokens": [40, 41]}).json() == {"prompt": CharTokenizer().decode([40, 41])}
    assert post("/detokenize", {"tokens": [1000]}).status_code == 400
    assert post("/tokenize", {"prompt": "a", "messages": []}).status_code == 400
    assert post("/tokenize", {"prompt": "a", "model": "other"}).status_code == 404


@pytest.mark.parametrize("body, words", [
    ({"prompt": []}, "empty"),
    ({"prompt": ["a"] * 20, "n": 16}, "sequences per request"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop": ["x"] * 65}, "stop"),
])
def test_requests_that_would_do_nothing_or_too_much_are_refused(body, words):
    gateway = ScriptedGateway()
    reply = post("/v1/completions", body, gateway)
    assert reply.status_code == 400 and words in reply.json()["error"]["message"], reply.text
    assert not gateway.calls


def test_a_duplicate_request_id_over_grpc_gets_already_exists():
    from kvmesh.services.gateway.request_ids import AlreadyExistsError
    from kvmesh.services.gateway.servicer import GatewayServicer
    from kvmesh.v1 import gateway_pb2

    class Context:
        def invocation_metadata(self):
            return ()

        def time_remaining(self):
            return 30.0

    async def scenario():
        gateway = ScriptedGateway()
        gateway.hold = asyncio.Event()
        servicer = GatewayServicer(gateway, AsyncTokenizer(CharTokenizer()))
        request = gateway_pb2.GenerateRequest(prompt="hi", request_id="mine",
                                              sampling=common_pb2.SamplingParams(seed=3))
        first = servicer.Generate(request, Context())
        pending = asyncio.ensure_future(anext(first))
        while not gateway.calls:
            await asyncio.sleep(0.01)
        try:
            await anext(servicer.Generate(request, Context()))
            raise AssertionError("the duplicate was served")
        except AlreadyExistsError as e:
            refused = str(e)
        gateway.hold.set()
        reply = await pending
        await first.aclose()
        return refused, reply, len(gateway.live_ids)

    refused, reply, live = asyncio.run(scenario())
    assert "already in flight" in refused and reply.text == "<3>" and live == 0


def test_a_stream_of_several_choices_delivers_each_after_all_have_started():
    gateway = ScriptedGateway()
    text = post("/v1/completions", {"prompt": ["ab", "cd"], "n": 2, "seed": 5, "stream": True}, gateway).text
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    by_index = {}
    for e in events:
        for c in e["choices"]:
            by_index[c["index"]] = by_index.get(c["index"], "") + c["text"]
    assert by_index == {0: "<5>", 1: "<6>", 2: "<5>", 3: "<6>"} and text.rstrip().endswith("data: [DONE]")
    assert not gateway.live_ids
