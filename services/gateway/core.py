"""The gateway's domain: validate a request, route it, stream its tokens back. Shared by gRPC and HTTP.

Both front ends turn their input into `GenerateCall`s and iterate `Gateway.generate()`, which yields
`kvmesh.v1.decode_pb2.DecodeResponse` messages; a failure anywhere surfaces as one of the typed errors every
service raises (`kvmesh.services.common.errors`), with a message a person can act on — a peer's failure keeps
the peer's status. Never a silent success: a decode stream that ends without its final message, or ends aborted,
is raised as UNAVAILABLE, and every error the client sees is counted in `kvmesh:request_failures_total`.
Cancelling the iteration (a client that goes away) cancels the
decode call, which frees the request's blocks on the decode and the prefill worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvmesh.services.clients.schedulers import SchedulerSet
from kvmesh.services.common import conventions as names
from kvmesh.services.common import telemetry
from kvmesh.services.common.api_keys import TENANT
from kvmesh.services.common.channels import ChannelCache
from kvmesh.services.common.errors import (InvalidArgumentError, MeshError, UnavailableError, describe, peer_text,
                                           status_for, unreachable)
from kvmesh.services.gateway.drain import Drain, LiveRequest
from kvmesh.services.gateway.failover import Attempts
from kvmesh.services.gateway.observe import RequestObserver
from kvmesh.services.gateway import slo
from kvmesh.services.gateway.request_ids import LiveIds
from kvmesh.services.gateway.sampling_checks import check_sampling_extras
from kvmesh.services.gateway.stall import next_message
from kvmesh.services.kv_identity import tenant_salt
from kvmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc, scheduler_pb2

DEFAULT_MAX_TOKENS = 16


@dataclass
class GenerateCall:
    """One generation as the gateway's front ends describe it."""

    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cache_salt: str = ""
    #: The caller's W3C trace context (from `traceparent` metadata or header); None starts a new trace.
    trace_parent: object = None
    #: `time.time_ns()` when the request's first byte reached the gateway; 0 means "now".
    arrival_ns: int = 0
    #: The front end it came through, the `api` label of the failure counter: "rpc" (the gRPC Gateway service)
    #: or "http" (the OpenAI-compatible API).
    api: str = "rpc"
    #: The request's latency objectives in seconds (gateway/slo.py); None: the scheduler's defaults.
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None


@dataclass(frozen=True)
class ModelCard:
    """What the gateway knows of the served model without loading its weights."""

    name: str
    path: str
    max_model_len: int
    vocab_size: int
    model_id: str

    @classmethod
    def from_path(cls, path: str, name: str | None = None) -> "ModelCard":
        """The card of the checkpoint folder at path (its config.json), served as name (default: the folder's)."""
        from kvmesh.services.engine.weights import model_id

        config = json.loads((Path(path) / "config.json").read_text())
        return cls(name or Path(path).name, str(path), int(config.get("max_position_embeddings", 2048)),
                   int(config["vocab_size"]), model_id(path))


def max_tokens_of(call: GenerateCall) -> int:
    """The most new tokens the call asks for, the default filled in."""
    s = call.sampling
    return s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS


def validate(call: GenerateCall, card: ModelCard) -> None:
    """Reject what no worker could serve, before it costs a route or a block."""
    ids, s = call.prompt_token_ids, call.sampling
    if not ids:
        raise InvalidArgumentError("the prompt is empty: send a prompt or prompt_token_ids")
    bad = [t for t in ids if not 0 <= t < card.vocab_size]
    if bad:
        raise InvalidArgumentError(f"prompt_token_ids {bad[:5]} are outside the vocabulary [0, {card.vocab_size})")
    max_tokens = max_tokens_of(call)
    if max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be at least 1, got {max_tokens}")
    if len(ids) + max_tokens > card.max_model_len:
        raise InvalidArgumentError(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of "
            f"{card.max_model_len} tokens: shorten the prompt or lower max_tokens")
    if s.HasField("temperature") and not s.temperature >= 0:
        raise InvalidArgumentError(f"temperature must be >= 0, got {s.temperature}")
    if s.HasField("top_p") and not 0 < s.top_p <= 1:
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {s.top_p}")
    if not 0 <= s.min_p <= 1:
        raise InvalidArgumentError(f"min_p must be in [0, 1], got {s.min_p}")
    if s.top_k < -1:
        raise InvalidArgumentError(f"top_k must be -1, 0 or positive, got {s.top_k}")
    if s.HasField("logprobs") and not 0 <= s.logprobs <= 20:
        raise InvalidArgumentError(f"logprobs must be in [0, 20], got {s.logprobs}")
    check_sampling_extras(s, card.vocab_size)


class Gateway:
    """Routes requests through the scheduler to a decode worker and relays its stream."""

    def __init__(self, card: ModelCard, scheduler_address: str, channels: ChannelCache,
                 route_timeout_s: float = 5.0, request_timeout_s: float = 600.0, reporter=None,
                 retry_limit: int = 0, migration_limit: int = 0, stall_check_s: float = 0.0, grammar_check=None):
        self.card = card
        self.grammar_check = grammar_check  # structured.GrammarCheck: compiles constraints before routing
        self.stall_check_s = stall_check_s  # silence after which a stream's worker must answer a health check
        self.retry_limit = retry_limit  # routes again before the first token (failover.Attempts)
        self.migration_limit = migration_limit  # continuations on another decode worker after it
        self.reporter = reporter  # a FailureReporter: tells the scheduler of decode workers it cannot reach
        self.schedulers = SchedulerSet(channels, scheduler_address)  # one or more, comma-separated: failover
        self.channels = channels
        self.route_timeout_s = route_timeout_s
        self.request_timeout_s = request_timeout_s
        self.drain = Drain()  # requests in flight; on SIGTERM, new ones are refused and late ones ended explicitly
        self.live_ids = LiveIds()  # request ids in flight: a client-chosen one used twice at once is refused

    async def route(self, call: GenerateCall, timeout: float | None, avoid=()) -> scheduler_pb2.RouteResponse:
        """Ask the scheduler for a (prefill, decode) pair, leaving out the workers in avoid where it can."""
        request = scheduler_pb2.RouteRequest(request_id=call.request_id, prompt_token_ids=call.prompt_token_ids,
                                             model=self.card.model_id, cache_salt=call.cache_salt,
                                             avoid_worker_ids=sorted(avoid), max_tokens=max_tokens_of(call),
                                             priority=call.sampling.priority)
        slo.apply(request, call.slo_ttft_s, call.slo_tpot_s)
        budget = min(timeout or self.route_timeout_s, self.route_timeout_s)
        with telemetry.tracer().start_as_current_span(names.SCHEDULER_ROUTE) as span:
            try:
                route = await self.schedulers.call("Route", request, timeout=budget)
            except grpc.aio.AioRpcError as e:
                raise MeshError.with_status(e.code(), f"routing failed: {peer_text(e)}") from e
            local = route.local_prefill  # the decode worker prefills: no prefill worker is on this request's way
            span.set_attributes({names.ATTR_ROUTE_PREFILL: "" if local else route.prefill.worker_id,
                                 names.ATTR_ROUTE_LOCAL_PREFILL: local,
                                 names.ATTR_ROUTE_DECODE: route.decode.worker_id,
                                 names.ATTR_ROUTE_REASON: route.policy,
                                 names.ATTR_CACHED_TOKENS: route.num_cached_tokens,
                                 names.ATTR_DECODE_CACHED_TOKENS: route.num_decode_cached_tokens})
            return route

    async def generate(self, call: GenerateCall, timeout: float | None = None
                       ) -> AsyncIterator[decode_pb2.DecodeResponse]:
        """Validate, route and stream one request's DecodeResponse messages, under its `gateway.Generate` span."""
        observer = RequestObserver(call.request_id, len(call.prompt_token_ids), call.arrival_ns, call.trace_parent)
        try:
            async for response in self._generate(call, timeout, observer):
                observer.token(len(response.token_ids))
                yield response
        except Exception as e:  # noqa: BLE001 — recorded on the root span and counted, then raised on
            observer.fail(status_for(e), describe(e))
            observer.count_failure(call.api, status_for(e))
            raise
        except BaseException as e:  # cancelled, or the consumer stopped early (GeneratorExit)
            observer.fail(grpc.StatusCode.CANCELLED, type(e).__name__)
            raise
        finally:
            observer.finish()

    async def _generate(self, call: GenerateCall, timeout: float | None, observer: RequestObserver
                        ) -> AsyncIterator[decode_pb2.DecodeResponse]:
        budget = min(timeout or self.request_timeout_s, self.request_timeout_s)
        # the one place a tenant's namespace is put on the salt (the key's tenant, set by the auth checks)
        call = dataclasses.replace(call, cache_salt=tenant_salt(TENANT.get(), call.cache_salt))
        attempts = Attempts(call, max_tokens_of(call), self.retry_limit, self.migration_limit,
                            deadline=time.monotonic() + budget)
        with self.drain.track() as live:
            with observer.context():
                validate(call, self.card)
            if self.grammar_check is not None:
                await self.grammar_check.check(call.sampling)
            while True:
                attempt = attempts.next_call()
                with observer.context():  # the route and the decode call are children of the root span
                    try:
                        route = await self.route(attempt, attempts.remaining_s(), attempts.avoid)
                    except MeshError:
                        attempts.raise_last()  # a retry nothing can take: the failure that asked for it
                        raise
                    live.check()  # the drain may have ended it while it was being routed
                    stub = decode_pb2_grpc.DecodeStub(self.channels.get(route.decode.address))
                    live.call = stub.Generate(decode_request(attempt, route), timeout=attempts.remaining_s())
                try:
                    async for response in relay(live, route.decode.address, attempt.request_id, self.stall_check_s):
                        yield attempts.relayed(response)
                    return
                except MeshError as e:
                    self._report_unreachable(route.decode, e.__cause__)
                    if live.cut or not attempts.again(e, route):
                        raise
                    attempts.last_error = e
                    observer.placed_again(attempts, e)

    def _report_unreachable(self, worker: scheduler_pb2.WorkerInfo, cause: BaseException | None) -> None:
        """Tell the scheduler of a decode worker the call never reached (its breaker then takes it out)."""
        if self.reporter is not None and isinstance(cause, grpc.aio.AioRpcError) and unreachable(cause):
            self.reporter.report(worker.worker_id, worker.address, scheduler_pb2.WORKER_ROLE_DECODE, cause)


def decode_request(call: GenerateCall, route: scheduler_pb2.RouteResponse) -> decode_pb2.DecodeRequest:
    """The decode worker's request: the call and the route plan's decisions, which the worker obeys."""
    request = decode_pb2.DecodeRequest(
        request_id=call.request_id, prompt_token_ids=call.prompt_token_ids, sampling=call.sampling,
        cache_salt=call.cache_salt, cached_prefix_tokens=route.num_cached_tokens,
        prompt_block_hashes=route.prompt_block_hashes, cache_probed=route.cache_probed,
        kv_peer_address=route.kv_peer.address if route.HasField("kv_peer") else "")
    if call.slo_ttft_s:  # what is left of it: a request that must wait for blocks past it is refused, not late
        waited_s = (time.time_ns() - call.arrival_ns) / 1e9 if call.arrival_ns else 0.0
        request.ttft_budget_seconds = max(call.slo_ttft_s - waited_s, 1e-3)
    if route.HasField("local_prefill"):
        request.local_prefill = route.local_prefill
    if route.HasField("prefill") and route.prefill.address:
        request.prefill.address = route.prefill.address
        request.prefill.worker_id = route.prefill.worker_id
        request.prefill.block_size = route.prefill.layout.block_size
    return request


FINISH_WAIT_S = 1.0  # the longest a finished stream waits for its status before the call is cancelled
UNFINISHED = (common_pb2.FINISH_REASON_ABORT, common_pb2.FINISH_REASON_ERROR)


async def relay(live: LiveRequest, address: str, request_id: str, stall_check_s: float = 0.0
                ) -> AsyncIterator[decode_pb2.DecodeResponse]:
    """The decode worker's messages up to the final one; any other end is raised as an error naming the worker
    (a dropped stream, a stream that stops before its final message, an aborted final message, a worker that
    stopped answering: stall.py)."""
    stream = live.call
    messages = aiter(stream)
    try:
        while (response := await next_message(messages, address, stall_check_s)) is not None:
            if response.finish_reason in UNFINISHED:
                raise UnavailableError(f"decode worker {address} aborted request {request_id}")
            yield response
            if response.finish_reason:
                # the worker's status follows its last message: let it end the call rather than cancel it in
                # between (a handler cancelled there is left unfinished, to be closed later out of its context)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(anext(messages, None), FINISH_WAIT_S)
                return
    except grpc.aio.AioRpcError as e:
        # CANCELLED from the peer (ours raises CancelledError) is the worker stopping, not the client going away
        code = grpc.StatusCode.UNAVAILABLE if e.code() is grpc.StatusCode.CANCELLED else e.code()
        raise MeshError.with_status(code, f"decode worker {address}: {peer_text(e)}") from e
    except asyncio.CancelledError:
        if not asyncio.current_task().cancelling():  # the call was cancelled, not this task: by the drain?
            live.check()  # then the client gets UNAVAILABLE, not a cut connection
        raise
    finally:
        stream.cancel()
        # closed, not left to the garbage collector: the tracing interceptor ends the call's client span (its
        # export) when this iterator ends, and the call object (which holds it) lives on in the drain's records
        with contextlib.suppress(Exception):
            await messages.aclose()
    live.check()
    raise UnavailableError(f"decode worker {address} ended request {request_id}'s stream before its last token")
