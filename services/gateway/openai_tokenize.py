"""POST /tokenize and /detokenize, as vLLM's OpenAI server has them: a prompt (or chat messages, rendered by the
model's template) to token ids, and token ids back to text. Both run the tokenizer off the event loop."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvmesh.services.common.errors import InvalidArgumentError, NotFoundError
from kvmesh.services.gateway.openai_checks import bad_unicode
from kvmesh.services.gateway.openai_schema import ChatMessage, TokenId


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        where = bad_unicode(data)
        if where:
            raise ValueError(f"{where} is not valid Unicode (a lone UTF-16 surrogate); send UTF-8 text")
        return data


class TokenizeRequest(_Body):
    """Either `prompt` or `messages`."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    tokens: list[TokenId] = Field(max_length=1 << 20)


def add_token_routes(app: FastAPI, frontend) -> None:
    """Register /tokenize and /detokenize on the gateway's app."""
    card = frontend.gateway.card

    def check_model(model: str | None) -> None:
        if model and model not in (card.name, card.path):
            raise NotFoundError(f"model {model!r} is not served here; this gateway serves {card.name!r}")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidArgumentError("send exactly one of prompt and messages")
        if body.prompt is not None:
            ids = await frontend.tokenizer.encode(body.prompt, body.add_special_tokens)
        else:
            ids = await frontend.tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages],
                                                       body.add_generation_prompt)
        strs = await frontend.tokenizer.tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": card.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        bad = [t for t in body.tokens if t >= card.vocab_size]
        if bad:
            raise InvalidArgumentError(f"tokens {bad[:5]} are outside the vocabulary [0, {card.vocab_size})")
        return {"prompt": await frontend.tokenizer.decode(body.tokens)}
