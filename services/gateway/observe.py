"""One request as the gateway watches it: the root `gateway.Generate` span and the latency metrics.

`RequestObserver` opens the request's root span at its arrival (the caller's W3C context as parent when one came
in), marks the first token (`kvmesh.ttft_s` and a `first_token` event), times the gaps between streamed messages,
and on `finish()` sets the output token count and mean inter-token latency, records the outcome, ends the span and
observes TTFT, TPOT, ITL and end-to-end latency in `kvmesh.services.common.metrics`.
"""

from __future__ import annotations

import time

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from kvmesh.services.common import conventions as names
from kvmesh.services.common import metrics, telemetry

ATTR_STATUS = "rpc.grpc.status_code"


class RequestObserver:
    """The root span and latency figures of one generation; call `token()` per streamed message, `finish()` once."""

    def __init__(self, request_id: str, num_prompt_tokens: int, arrival_ns: int | None = None, parent=None):
        self.arrival_ns = arrival_ns or time.time_ns()
        self.span = telemetry.tracer().start_span(
            names.REQUEST_SPAN, context=parent, kind=SpanKind.SERVER, start_time=self.arrival_ns,
            attributes={names.ATTR_REQUEST_ID: request_id, names.ATTR_PROMPT_TOKENS: num_prompt_tokens})
        self.num_tokens = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self._done = False

    def context(self):
        """A context manager making the root span current (for the calls that must be its children)."""
        return trace.use_span(self.span, end_on_exit=False)

    def token(self, count: int) -> None:
        """A message with `count` new tokens arrived from the decode worker."""
        if count <= 0:
            return
        now = time.time_ns()
        if self.first_ns is None:
            self.first_ns = now
            ttft = (now - self.arrival_ns) / 1e9
            self.span.set_attribute(names.ATTR_TTFT_S, ttft)
            self.span.add_event(names.EVENT_FIRST_TOKEN, timestamp=now)
        else:
            metrics.INTER_TOKEN_LATENCY.observe((now - self.last_ns) / 1e9)
        self.last_ns = now
        self.num_tokens += count

    def placed_again(self, attempts, error: BaseException) -> None:
        """A worker failed the request and it is placed again (a `failover.Attempts` said so): an event on the
        root span, so a trace shows each attempt's route and decode call beneath it and why the next began."""
        self.span.add_event(names.EVENT_PLACED_AGAIN, attributes={
            "kvmesh.attempt": attempts.number, "kvmesh.relayed_tokens": len(attempts.emitted),
            "kvmesh.avoid": sorted(attempts.avoid), "exception.message": str(error)})

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """The request ended with an error (the status of the typed error it raised, or CANCELLED)."""
        self.span.set_attribute(ATTR_STATUS, code.value[0])
        self.span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))

    def count_failure(self, api: str, code: grpc.StatusCode) -> None:
        """Count an error the client sees in `kvmesh:request_failures_total`, at the stage the request reached."""
        stage = "after_first_token" if self.first_ns is not None else "before_first_token"
        metrics.REQUEST_FAILURES.labels(api=api, stage=stage, code=code.name).inc()

    def finish(self) -> None:
        """End the span and observe the request's latencies; idempotent."""
        if self._done:
            return
        self._done = True
        end_ns = time.time_ns()
        self.span.set_attribute(names.ATTR_OUTPUT_TOKENS, self.num_tokens)
        e2e = (end_ns - self.arrival_ns) / 1e9
        self.span.set_attribute(names.ATTR_E2E_S, e2e)
        if self.first_ns is not None:
            if self.num_tokens > 1:
                mean_itl = (self.last_ns - self.first_ns) / 1e9 / (self.num_tokens - 1)
                self.span.set_attribute(names.ATTR_MEAN_ITL_S, mean_itl)
            metrics.observe_request((self.first_ns - self.arrival_ns) / 1e9, e2e, self.num_tokens)
        self.span.end(end_time=end_ns)
