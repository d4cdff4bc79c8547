"""What every benchmark client shares: the interface, and the reading of an OpenAI SSE stream into a result.

Times are taken with `time.perf_counter()` right before a request goes out and as each token-carrying event is
parsed, so a client's own cost sits inside what it reports and must stay small (bench/serve_overhead.py).
"""

from __future__ import annotations

import json
import time

from kvmesh.services.bench.datasets import BenchRequest
from kvmesh.services.bench.metrics import RequestResult


class BenchClient:
    """Sends one request per call; many calls run at once on one event loop. `send` never raises for a failed
    request: the failure is the result's `error`, named by its status."""

    async def send(self, request: BenchRequest, result: RequestResult) -> None:
        """Send `request`, streaming, and record its timings and outcome into `result`."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""


def completion_body(request: BenchRequest, model: str | None) -> dict:
    """The `/v1/completions` body: token ids as the prompt (the gateway and vLLM accept them), greedy, streamed
    with a final usage chunk, and vLLM's `ignore_eos` so every output has the asked length."""
    body = {"prompt": request.prompt_ids, "max_tokens": request.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if model:
        body["model"] = model
    return body


class SseReader:
    """Feeds an OpenAI completion stream's lines into a result: a token time per event with choices, usage from
    the last chunk, an error event (sent after a 200 status line) as the result's error."""

    def __init__(self, result: RequestResult, start: float):
        self.result, self.start = result, start
        self.chunks = 0
        self.done = False

    def line(self, line: str) -> bool:
        """Take one line of the body; True once the stream has ended (`[DONE]` or an error event)."""
        if not line.startswith("data:"):
            return False
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return True
        event = json.loads(data)
        result = self.result
        if "error" in event:
            result.error = f"http_{event['error'].get('code', 'stream_error')}"
            return True
        if event.get("choices"):
            now = time.perf_counter() - self.start
            if result.ttft_s is None:
                result.ttft_s = now
            result.token_times_s.append(now)
            self.chunks += 1
        usage = event.get("usage")
        if usage:
            result.output_tokens = usage.get("completion_tokens", 0)
            result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return False

    def finish(self) -> None:
        """The body ended: without `[DONE]` the request is incomplete, whatever came before."""
        if self.result.error is not None:
            return
        if not self.done:
            self.result.error = "incomplete"
        elif not self.result.output_tokens:
            self.result.output_tokens = self.chunks  # no usage: one token per chunk, as vLLM's client counts
