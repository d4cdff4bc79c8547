"""Retries before the first token and migration after it: a request whose prefill or decode worker fails is
placed again, and the client sees only latency.

Before the first token, a failed attempt is routed again (`retry_limit` times), avoiding the workers it failed on.
After it, the gateway, which knows every token it has relayed, re-issues the prompt plus those tokens to another
decode worker as a continuation (`migration_limit` times): that worker computes (or fetches from the cache) their
KV and generates only what is left, so the client's stream goes on with no token lost or repeated, and the usage
it is finally told counts the original prompt and every generated token. Greedy output equals the uninterrupted
run. Known seams: a seeded sampler starts a new random stream at the migration point, a stop string that spans it
is not seen, and a character whose UTF-8 bytes were split across the point is lost from the text (never from the
token ids).

Only failures a retry can mend are retried (a worker gone, a transfer corrupted or lapsed inside the mesh); what
the client sent (INVALID_ARGUMENT), admission (RESOURCE_EXHAUSTED) and the request's own deadline are final.
"""

from __future__ import annotations

import dataclasses
import time

import grpc

from kvmesh.services.common import metrics
from kvmesh.services.common.errors import status_for
from kvmesh.v1 import common_pb2, decode_pb2, scheduler_pb2

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DATA_LOSS,
                       grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


class Attempts:
    """One request's attempts: what was relayed so far, which workers failed it, and the next attempt's call."""

    def __init__(self, call, max_tokens: int, retry_limit: int, migration_limit: int, deadline: float):
        self.call = call  # a GenerateCall, as the client sent it
        self.max_tokens = max_tokens  # the call's, its default filled in
        self.retry_limit = retry_limit
        self.migration_limit = migration_limit
        self.deadline = deadline  # time.monotonic() past which no attempt starts
        self.emitted: list[int] = []
        self.avoid: set[str] = set()
        self.num_retries = 0
        self.last_error: BaseException | None = None  # what failed the previous attempt
        self.num_migrations = 0

    @property
    def number(self) -> int:
        """0 for the first attempt, then one more for each retry or migration."""
        return self.num_retries + self.num_migrations

    def remaining_s(self) -> float:
        """Seconds left of the request's deadline."""
        return max(0.0, self.deadline - time.monotonic())

    def raise_last(self) -> None:
        """Raise what failed the previous attempt, if any (the next one found no worker to go to)."""
        if self.last_error is not None:
            raise self.last_error

    def next_call(self):
        """The call this attempt sends: the client's, or a continuation of it after the tokens relayed so far."""
        if not self.emitted and self.number == 0:
            return self.call
        suffix = f".{self.number}"  # the failed attempt may linger on a worker under the first id
        if not self.emitted:
            return dataclasses.replace(self.call, request_id=self.call.request_id + suffix)
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(self.call.sampling)
        sampling.max_tokens = self.max_tokens - len(self.emitted)
        if sampling.HasField("structured_output"):  # the new worker's matcher resumes after the relayed tokens
            sampling.structured_output.num_resumed_tokens += len(self.emitted)
        return dataclasses.replace(self.call, request_id=self.call.request_id + suffix, sampling=sampling,
                                   prompt_token_ids=[*self.call.prompt_token_ids, *self.emitted])

    def relayed(self, response: decode_pb2.DecodeResponse) -> decode_pb2.DecodeResponse:
        """Note a message on its way to the client; a continuation's final usage is made the whole request's."""
        self.emitted.extend(response.token_ids)
        if response.HasField("usage") and self.num_migrations:
            usage = response.usage
            usage.prompt_tokens = len(self.call.prompt_token_ids)
            usage.cached_tokens = min(usage.cached_tokens, usage.prompt_tokens)
            usage.completion_tokens = len(self.emitted)
        return response

    def again(self, error: BaseException, route: scheduler_pb2.RouteResponse) -> bool:
        """Whether the request is placed again after error on route's workers (then counted and noted)."""
        code = status_for(error)
        if code not in RETRYABLE or self.remaining_s() <= 0:
            return False
        if self.emitted:
            if self.num_migrations >= self.migration_limit or len(self.emitted) >= self.max_tokens:
                return False
            self.num_migrations += 1
            stage = "after_first_token"
        else:
            if self.num_retries >= self.retry_limit:
                return False
            self.num_retries += 1
            stage = "before_first_token"
            self.avoid.add(route.prefill.worker_id)  # either may be the one that failed: try both elsewhere
        self.avoid.add(route.decode.worker_id)
        self.avoid.discard("")
        metrics.REQUEST_RETRIES.labels(stage=stage, code=code.name).inc()
        return True
