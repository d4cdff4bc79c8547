"""Both front ends tokenise on the tokenizer's own thread, never on the event loop."""

import asyncio
import threading

import httpx

from kvmesh.services.gateway.core import ModelCard
from kvmesh.services.gateway.openai_api import OpenAIFrontend, build_app
from kvmesh.services.gateway.drain import Drain
from kvmesh.services.gateway.request_ids import LiveIds
from kvmesh.services.gateway.servicer import GatewayServicer
from kvmesh.services.gateway.tokens import AsyncTokenizer
from kvmesh.v1 import common_pb2, decode_pb2, gateway_pb2

CARD = ModelCard("tiny", "/models/tiny", max_model_len=64, vocab_size=100, model_id="tiny-0")


class RecordingTokenizer:
    """One token per character; remembers the thread of every call."""

    def __init__(self):
        self.threads: list[str] = []

    def encode(self, text, add_special_tokens=True):
        self.threads.append(threading.current_thread().name)
        return [ord(c) % 100 for c in text]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        self.threads.append(threading.current_thread().name)
        return "".join(m["content"] for m in messages)

    def convert_ids_to_tokens(self, ids):
        self.threads.append(threading.current_thread().name)
        return [chr(i) for i in ids]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class OneTokenGateway:
    """A gateway whose every request generates one token and stops; remembers the prompts it got."""

    card = CARD

    def __init__(self):
        self.prompts: list[list[int]] = []
        self.drain = Drain()  # never draining
        self.live_ids = LiveIds()

    async def generate(self, call, timeout=None):
        self.prompts.append(list(call.prompt_token_ids))
        yield decode_pb2.DecodeResponse(token_ids=[7], text="a", finish_reason=common_pb2.FINISH_REASON_STOP,
                                        usage=common_pb2.Usage(prompt_tokens=len(call.prompt_token_ids),
                                                               completion_tokens=1))


class Context:
    """The parts of a grpc.aio ServicerContext the gateway servicer reads."""

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None


def off_loop(tokenizer: RecordingTokenizer) -> bool:
    return bool(tokenizer.threads) and all(name.startswith("tokenize") for name in tokenizer.threads)


def test_grpc_generate_and_tokenize_tokenise_off_the_loop():
    tokenizer, gateway = RecordingTokenizer(), OneTokenGateway()
    servicer = GatewayServicer(gateway, AsyncTokenizer(tokenizer))

    async def body():
        replies = [r async for r in servicer.Generate(gateway_pb2.GenerateRequest(prompt="hi"), Context())]
        tokens = await servicer.Tokenize(gateway_pb2.TokenizeRequest(text="hey"), Context())
        return replies, tokens

    replies, tokens = asyncio.run(body())
    assert gateway.prompts == [[ord("h") % 100, ord("i") % 100]] and replies[0].token_ids == [7]
    assert list(tokens.tokens) == [chr(ord(c) % 100) for c in "hey"]
    assert off_loop(tokenizer)


def test_http_completions_and_chat_tokenise_off_the_loop():
    tokenizer, gateway = RecordingTokenizer(), OneTokenGateway()
    app = build_app(OpenAIFrontend(gateway, AsyncTokenizer(tokenizer)), None, max_body_bytes=1 << 20)

    async def body():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            completion = await client.post("/v1/completions", json={"prompt": ["hi", "ho"], "max_tokens": 2})
            chat = await client.post("/v1/chat/completions",
                                     json={"messages": [{"role": "user", "content": "yo"}], "max_tokens": 2})
            return completion, chat

    completion, chat = asyncio.run(body())
    assert completion.status_code == 200 and chat.status_code == 200, (completion.text, chat.text)
    assert len(gateway.prompts) == 3
    assert off_loop(tokenizer) and len(tokenizer.threads) == 4  # two prompts, one template, its encoding
