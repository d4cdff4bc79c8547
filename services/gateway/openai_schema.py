"""The OpenAI-compatible request bodies the gateway accepts, and their mapping to kvmesh sampling params.

Fields that OpenAI clients send in practice are accepted (`max_completion_tokens`, `stream_options`, chat
content as text parts, `n`, `seed`, `logprobs`/`top_logprobs`) along with vLLM's extensions (`ignore_eos`,
`top_k`, `min_p`). Unknown fields are ignored, as the OpenAI API does; knobs kvmesh does not implement with a
non-default value are refused with a message, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvmesh.v1 import common_pb2

MAX_N = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """Parameters shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = None
    request_id: str | None = None

    def unsupported(self) -> str | None:
        """A message naming a knob set to something kvmesh does not implement, or None."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported by kvmesh; leave them at 0"
        if not 1 <= self.n <= MAX_N:
            return f"n must be between 1 and {MAX_N}, got {self.n}"
        return None

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return None

    def sampling(self, index: int = 0) -> common_pb2.SamplingParams:
        """kvmesh sampling params for choice `index` (each choice of n gets its own seed stream)."""
        params = common_pb2.SamplingParams(
            top_k=self.top_k or 0, min_p=self.min_p or 0.0, ignore_eos=self.ignore_eos,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=self.stop_token_ids or [])
        params.temperature = 1.0 if self.temperature is None else self.temperature
        if self.top_p is not None:
            params.top_p = self.top_p
        if self._max_tokens() is not None:
            params.max_tokens = self._max_tokens()
        if self.seed is not None:
            params.seed = self.seed + index
        if self._logprobs() is not None:
            params.logprobs = self._logprobs()
        return params


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def _logprobs(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> str | None:
        if self.echo or self.suffix:
            return "echo and suffix are not supported by kvmesh"
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
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def rendered(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]
