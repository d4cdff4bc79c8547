"""Rendering gateway streams as OpenAI response objects: whole responses, SSE chunks, usage, logprobs."""

from __future__ import annotations

import time

from kvmesh.v1 import common_pb2

FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
          common_pb2.FINISH_REASON_ABORT: "abort", common_pb2.FINISH_REASON_ERROR: "error"}


def usage(choices) -> dict:
    """OpenAI usage over every choice; prompt tokens counted once per distinct prompt."""
    prompts = {}
    for c in choices:
        if c.usage is not None:
            prompts[tuple(c.call.prompt_token_ids)] = (c.usage.prompt_tokens, c.usage.cached_tokens)
    prompt = sum(p for p, _ in prompts.values())
    cached = sum(c for _, c in prompts.values())
    completion = sum(c.usage.completion_tokens for c in choices if c.usage is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _Renderer:
    object_whole = ""
    object_chunk = ""

    def __init__(self, request_id: str, model: str, tokenizer):
        self.id, self.model, self.tokenizer = request_id, model, tokenizer
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def opening(self, choices) -> list[dict]:
        return []

    def usage_chunk(self, choices) -> dict:
        return self._envelope(self.object_chunk, [], usage=usage(choices))


class CompletionRenderer(_Renderer):
    """text_completion objects."""

    object_whole = object_chunk = "text_completion"

    def _logprobs(self, entries, offset: int = 0) -> dict | None:
        if not entries:
            return None
        tokens = [self._token(e.token_id) for e in entries]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        top = [{self._token(t): lp for t, lp in zip(e.top_token_ids, e.top_logprobs)} for e in entries]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
                "text_offset": offsets}

    def whole(self, choices) -> dict:
        body = [{"index": c.index, "text": c.echo + "".join(c.text), "logprobs": self._logprobs(c.logprobs),
                 "finish_reason": c.finish_reason} for c in choices]
        return self._envelope(self.object_whole, body, usage=usage(choices))

    def opening(self, choices) -> list[dict]:
        """With echo, each choice's first chunk is its prompt."""
        return [self._envelope(self.object_chunk, [{"index": c.index, "text": c.echo, "logprobs": None,
                                                    "finish_reason": None}]) for c in choices if c.echo]

    def chunk(self, choice, response, include_usage: bool) -> dict:
        finish = FINISH.get(response.finish_reason)
        body = [{"index": choice.index, "text": response.text, "logprobs": self._logprobs(response.logprobs),
                 "finish_reason": finish}]
        return self._envelope(self.object_chunk, body, **({"usage": None} if include_usage else {}))


class ChatRenderer(_Renderer):
    """chat.completion and chat.completion.chunk objects."""

    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = self._token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    def _logprobs(self, entries) -> dict | None:
        if not entries:
            return None
        return {"content": [
            {**self._entry(e.token_id, e.logprob),
             "top_logprobs": [self._entry(t, lp) for t, lp in zip(e.top_token_ids, e.top_logprobs)]}
            for e in entries]}

    def whole(self, choices) -> dict:
        body = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                 "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason} for c in choices]
        return self._envelope(self.object_whole, body, usage=usage(choices))

    def opening(self, choices) -> list[dict]:
        return [self._envelope(self.object_chunk, [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]) for c in choices]

    def chunk(self, choice, response, include_usage: bool) -> dict:
        delta = {"content": response.text} if response.text or not response.finish_reason else {}
        body = [{"index": choice.index, "delta": delta, "logprobs": self._logprobs(response.logprobs),
                 "finish_reason": FINISH.get(response.finish_reason)}]
        return self._envelope(self.object_chunk, body, **({"usage": None} if include_usage else {}))
