"""Hostile request bodies never get a 5xx from the OpenAI API: hypothesis draws every field the API knows, with
values of every JSON type and extreme numbers (well-typed but out of range, NaN, huge integers, lone surrogates),
and each answer is a 2xx or a 4xx in OpenAI's error shape. A fixed budget, so CI time stays bounded."""

import asyncio
import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_openai_honest import ScriptedGateway, app_of

NUMBERS = st.one_of(st.integers(min_value=-2**80, max_value=2**80), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2**31, 2**63, 0.5]))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "", "hi"]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
          "best_of", "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
          "logit_bias", "logprobs", "top_logprobs", "echo", "top_k", "min_p", "repetition_penalty", "ignore_eos",
          "stop_token_ids", "cache_salt", "request_id", "tools", "response_format", "suffix", "user"]
BASES = st.sampled_from([{}, {"prompt": "hi"}, {"prompt": [1, 2]}, {"tokens": [1, 2]},
                          {"messages": [{"role": "user", "content": "hi"}]}])
BODIES = st.builds(lambda base, extra: {**base, **extra}, BASES,
                   st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6))
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])


def dumps(body) -> str:
    return json.dumps(body, allow_nan=True)  # NaN and Infinity literals, which Python's JSON parser accepts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=PATHS, body=st.one_of(BODIES, VALUES))
def test_no_hostile_body_gets_a_5xx(path, body):
    async def send():
        transport = httpx.ASGITransport(app=app_of(ScriptedGateway()))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.post(path, content=dumps(body), headers={"content-type": "application/json"})

    reply = asyncio.run(send())
    assert reply.status_code < 500, (path, body, reply.text)
    if reply.status_code >= 400:
        assert reply.json()["error"]["message"]
