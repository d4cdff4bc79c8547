"""The OpenAI-compatible request bodies the gateway accepts, and their mapping to kvmesh sampling params.

Fields that OpenAI clients send in practice are accepted (`max_completion_tokens`, `stream_options`, chat
content as text parts, `n`, `best_of`, `seed`, `logprobs`/`top_logprobs`, the penalties, `logit_bias`, `echo`)
along with vLLM's extensions (`ignore_eos`, `top_k`, `min_p`, `repetition_penalty`). Every number is range-checked
here, before it reaches a proto or the engine (a value out of range, NaN or infinity is a 400 naming the field);
fields kvmesh does not implement are refused with a 400 naming them (`openai_checks`); fields nobody defines are
ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.services.gateway.openai_checks import bad_unicode, unsupported_field
from kvmesh.services.gateway.sampling_checks import MAX_PRIORITY
from kvmesh.services.gateway.structured import requested
from kvmesh.v1 import common_pb2

MAX_N = 16  # choices (n) and candidates (best_of) per prompt at most
MAX_LOGPROBS = 20
MAX_STOPS, MAX_STOP_CHARS = 64, 1024
MAX_SEQUENCES = 256  # prompts x candidates per request at most
INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1 - MAX_N  # a choice's seed is seed + its index, which must fit the engine's int64

TokenId = Annotated[int, Field(ge=0, le=INT32)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
_STRICT = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """Parameters shared by completions and chat completions."""

    model_config = _STRICT

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=INT32)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    cache_salt: str | None = None
    request_id: str | None = Field(None, max_length=256)
    # vLLM's scheduling priority: lower is more urgent; an integer (strict: no strings, floats or booleans)
    priority: int = Field(0, strict=True, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = bad_unicode(data)
        if where:
            raise ValueError(f"{where} is not valid Unicode (a lone UTF-16 surrogate); send UTF-8 text")
        return data

    def unsupported(self) -> str | None:
        """A message naming a field set to something kvmesh does not implement, or None."""
        found = unsupported_field(self.model_extra or {})
        if found:
            return f"{found[0]}: {found[1]}"
        try:
            requested(self.model_extra or {})
        except InvalidArgumentError as e:
            return str(e)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not 0 < len(x) <= MAX_STOP_CHARS for x in stops):
            return f"stop: at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters each"
        if self.best_of is not None and self.best_of < self.n:
            return f"best_of ({self.best_of}) must be at least n ({self.n})"
        if self.num_candidates > self.n and self.stream:
            return "best_of greater than n cannot be streamed (the best are known only at the end); set stream false"
        return None

    @property
    def num_candidates(self) -> int:
        """Sequences generated per prompt: best_of, else n."""
        return self.best_of or self.n

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.strip().isdigit() or int(key) > INT32:
                raise ValueError(f"key {key[:20]!r} is not a token id (an integer in [0, 2**31))")
        return value

    def bias(self) -> dict[int, float]:
        """logit_bias with its keys as token ids (OpenAI sends them as strings)."""
        return {int(key): value for key, value in (self.logit_bias or {}).items()}

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return None

    def sampling(self, index: int = 0) -> common_pb2.SamplingParams:
        """kvmesh sampling params for candidate `index` (each candidate gets its own seed stream)."""
        params = common_pb2.SamplingParams(
            top_k=self.top_k or 0, min_p=self.min_p or 0.0, ignore_eos=self.ignore_eos,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=self.stop_token_ids or [], presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, logit_bias=self.bias(), priority=self.priority)
        params.temperature = 1.0 if self.temperature is None else self.temperature
        if self.top_p is not None:
            params.top_p = self.top_p
        if self.repetition_penalty is not None:
            params.repetition_penalty = self.repetition_penalty
        if self._max_tokens() is not None:
            params.max_tokens = self._max_tokens()
        if self.seed is not None:
            params.seed = self.seed + index
        logprobs = self.requested_logprobs()
        if logprobs is None and self.best_of is not None:
            logprobs = 0  # candidates are ranked by cumulative logprob; the gateway drops them from the reply
        if logprobs is not None:
            params.logprobs = logprobs
        structured = requested(self.model_extra or {})  # response_format, guided_*, structured_outputs
        if structured is not None:
            params.structured_output.CopyFrom(structured)
        return params


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> str | None:
        p = self.prompt
        num_prompts = len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1
        if isinstance(p, list) and not p:
            return "prompt: the prompt is empty; send a string, a list of strings or token ids"
        if num_prompts * self.num_candidates > MAX_SEQUENCES:
            return (f"prompt: {num_prompts} prompts x {self.num_candidates} candidates exceeds {MAX_SEQUENCES} "
                    "sequences per request; split the batch")
        if self.echo and self.logprobs is not None:
            return ("echo with logprobs is not supported: kvmesh does not compute prompt logprobs; "
                    "drop logprobs or echo")
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    def unsupported(self) -> str | None:
        if (self.model_extra or {}).get("echo"):
            return "echo: echoing the last message is not supported for chat by kvmesh; leave it out"
        return super().unsupported()

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def rendered(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]
