"""One decode request's outgoing stream: the DecodeResponse messages (text deltas, logprobs, usage, timings) and
the `decode.stream` span that measures it."""

from __future__ import annotations

import time

from kvmesh.services.common import telemetry
from kvmesh.services.worker.convert import logprob_protos
from kvmesh.services.decode.detokenizer import IncrementalDetokenizer
from kvmesh.services.common import conventions as names
from kvmesh.v1 import common_pb2, decode_pb2

FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH,
          "abort": common_pb2.FINISH_REASON_ABORT}


class TokenStream:
    """One request's outgoing stream: text deltas, logprobs, usage, and a first token sent ahead of the engine."""

    def __init__(self, detok: IncrementalDetokenizer, num_prompt_tokens: int, start: float):
        self.detok, self.num_prompt_tokens, self.start = detok, num_prompt_tokens, start
        self.num_generated = self.cached = 0
        self.token_ids: list[int] = []  # generated so far, as sent
        self.timings = common_pb2.Timings()
        self.skip_first = False  # the engine's first output repeats the token already sent early

    def _first_token_now(self) -> None:
        if not self.timings.time_to_first_token_seconds:
            self.timings.time_to_first_token_seconds = time.perf_counter() - self.start

    def early(self, token_id: int, logprobs: list) -> decode_pb2.DecodeResponse:
        """The first token, sent as soon as the prefill worker returns it (before the engine's first step)."""
        self.skip_first = True
        self.num_generated = 1
        self.token_ids.append(token_id)
        self._first_token_now()
        return decode_pb2.DecodeResponse(token_ids=[token_id], text=self.detok.add([token_id]), logprobs=logprobs)

    def response(self, out) -> decode_pb2.DecodeResponse:
        """The message of one engine output (usage and timings on the last)."""
        ids, entries = list(out.new_token_ids), list(out.logprobs or [])
        if self.skip_first and ids:
            ids, entries, self.skip_first = ids[1:], entries[1:], False
        logprobs = logprob_protos(ids, entries)
        self.num_generated += len(ids)
        self.token_ids += ids
        if ids:
            self._first_token_now()
        text = self.detok.add(ids) + (self.detok.flush() if out.finished else "")
        response = decode_pb2.DecodeResponse(token_ids=ids, text=text, logprobs=logprobs)
        if out.finished:
            response.finish_reason = FINISH.get(out.finish_reason, common_pb2.FINISH_REASON_STOP)
            response.usage.CopyFrom(common_pb2.Usage(
                prompt_tokens=self.num_prompt_tokens, completion_tokens=self.num_generated,
                cached_tokens=max(self.cached, out.num_cached_tokens)))
            response.timings.CopyFrom(self.timings)
        return response


class StreamWatch:
    """The `decode.stream` span of one request: from admission to its last token, with the decode worker's TTFT
    (from the request's arrival here) and mean ITL."""

    def __init__(self, arrival_ns: int):
        self.span = telemetry.tracer().start_span(names.DECODE_STREAM)
        self.start_ns = arrival_ns
        self.first_ns = self.last_ns = 0
        self.count = 0

    def tokens(self, count: int) -> None:
        """`count` tokens were sent now."""
        if count <= 0:
            return
        self.last_ns = time.time_ns()
        if not self.first_ns:
            self.first_ns = self.last_ns
            self.span.set_attribute(names.ATTR_TTFT_S, (self.first_ns - self.start_ns) / 1e9)
        self.count += count

    def end(self, num_generated: int) -> None:
        """End the span with the number of tokens generated."""
        self.span.set_attribute(names.ATTR_OUTPUT_TOKENS, num_generated)
        if self.count > 1:
            self.span.set_attribute(names.ATTR_MEAN_ITL_S, (self.last_ns - self.first_ns) / 1e9 / (self.count - 1))
        self.span.end()
