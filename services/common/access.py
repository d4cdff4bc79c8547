"""Who may call what, with mTLS on: the role in the caller's certificate against one table of RPCs.

The table follows the request's way (shared/DESIGN.md) and the services' real calls:

| caller role | may call |
| --- | --- |
| prefill, decode, cache | Scheduler.Register (as its own role only), Heartbeat, Deregister (of its own role's workers) |
| gateway | Scheduler.Route, ListWorkers, ReportFailure; Decode.Generate, Abort |
| decode | Prefill.Prefill; Scheduler.ListWorkers, ReportFailure; Cache.Lookup, Get, Fetch, Put, Pin, Unpin |
| prefill | KVTransfer.* (into decode workers); Scheduler.ListWorkers; Cache.Lookup, Get, Fetch, Put, Pin, Unpin |
| cache | KVTransfer.* (blocks it serves, into prefill and decode workers) |
| decode | KVTransfer.* (its readiness self-transfer into its own pool, through its own port; and the blocks of its pool it serves to a prefill worker's Cache.Fetch: peer pull) |
| scheduler | Cache.Lookup (its cache probe) |
| admin (operators' tools) | Stats of every service, Cache.Clear, Pin, Unpin, Lookup, ListWorkers, Deregister, Abort, SetWorkerRole |
| worker (flexible workers) | exactly the union of prefill's and decode's rights: Register as prefill or decode (never cache), Heartbeat and Deregister of prefill and decode workers, and every RPC either may call |
| any certificate of the CA | grpc.health.v1.Health (launchers, probes, the gateway's stall checks) |

An RPC not in the table is refused (closed by default). A refused call ends PERMISSION_DENIED with a message naming
the role it came with and the roles it needs, before its handler runs. A caller with no certificate never gets
here: the TLS handshake fails.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kvmesh.services.common import tls
from kvmesh.v1 import scheduler_pb2

#: A flexible worker's certificate (`kvmesh worker --role auto`): whatever a prefill or a decode certificate may do.
FLEXIBLE = "worker"
WORKERS = frozenset({"prefill", "decode", "cache", FLEXIBLE})
ENGINES = frozenset({"prefill", "decode", FLEXIBLE})
ANY = frozenset({"gateway", "scheduler", "prefill", "decode", "cache", "admin", FLEXIBLE})
ADMIN = frozenset({"admin"})
# The roles a worker may register as (and act for), by the role its certificate names.
REGISTER_ROLES = {"prefill": frozenset({scheduler_pb2.WORKER_ROLE_PREFILL}),
                  "decode": frozenset({scheduler_pb2.WORKER_ROLE_DECODE}),
                  "cache": frozenset({scheduler_pb2.WORKER_ROLE_CACHE}),
                  FLEXIBLE: frozenset({scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE})}


def _register_as_own_role(request, role: str) -> str | None:
    """Refusal text when a worker registers as a role its certificate does not name."""
    if request.role in REGISTER_ROLES.get(role, ()):
        return None
    asked = scheduler_pb2.WorkerRole.Name(request.role) if request.role in scheduler_pb2.WorkerRole.values() \
        else str(request.role)
    if role == FLEXIBLE:
        return f"a {role} certificate may not Register as {asked}: a flexible worker registers as prefill or decode"
    fix = " (a flexible worker that flips roles needs the worker certificate)" if role in ENGINES else ""
    return f"a {role} certificate may not Register as {asked}: register with the role the certificate names{fix}"


def owner_refusal(role: str | None, worker_role: int) -> str | None:
    """Why a caller with `role` may not heartbeat or deregister a worker registered as `worker_role` (the scheduler
    asks, as only it knows the worker's role); None: it may. Without mTLS there is no role, and nothing to check."""
    if role is None or role == "admin" or worker_role in REGISTER_ROLES.get(role, ()):
        return None
    return (f"a {role} certificate may not act for a worker registered as "
            f"{scheduler_pb2.WorkerRole.Name(worker_role)}")


@dataclass(frozen=True)
class Rule:
    """The roles allowed to call an RPC, and an optional check of its request against the caller's role
    (returns a refusal text, or None)."""

    roles: frozenset[str]
    check: Callable[[object, str], str | None] | None = None


_KV = Rule(frozenset({"prefill", "cache", "decode", FLEXIBLE}))  # decode: its self-transfer, peer pull
TABLE: dict[str, Rule] = {
    "/kvmesh.v1.Scheduler/Register": Rule(WORKERS, _register_as_own_role),
    "/kvmesh.v1.Scheduler/Heartbeat": Rule(WORKERS),
    "/kvmesh.v1.Scheduler/Deregister": Rule(WORKERS | ADMIN),
    "/kvmesh.v1.Scheduler/Route": Rule(frozenset({"gateway"})),
    "/kvmesh.v1.Scheduler/ListWorkers": Rule(ENGINES | {"gateway", "admin"}),
    "/kvmesh.v1.Scheduler/ReportFailure": Rule(frozenset({"gateway", "decode", FLEXIBLE})),
    "/kvmesh.v1.Decode/Generate": Rule(frozenset({"gateway"})),
    "/kvmesh.v1.Decode/Abort": Rule(frozenset({"gateway", "admin"})),
    "/kvmesh.v1.Decode/Stats": Rule(ADMIN),
    "/kvmesh.v1.Scheduler/Stats": Rule(ADMIN),  # the fitted cost models, for operators
    "/kvmesh.v1.Scheduler/SetWorkerRole": Rule(ADMIN),  # `kvmesh role`: flip a flexible worker
    "/kvmesh.v1.Prefill/Prefill": Rule(frozenset({"decode", FLEXIBLE})),
    "/kvmesh.v1.Prefill/Stats": Rule(ADMIN),
    "/kvmesh.v1.KVTransfer/Open": _KV,
    "/kvmesh.v1.KVTransfer/Push": _KV,
    "/kvmesh.v1.KVTransfer/Commit": _KV,
    "/kvmesh.v1.KVTransfer/Abort": _KV,
    "/kvmesh.v1.KVTransfer/LayerWritten": _KV,
    "/kvmesh.v1.Cache/Lookup": Rule(ENGINES | {"scheduler", "admin"}),
    "/kvmesh.v1.Cache/Put": Rule(ENGINES),
    "/kvmesh.v1.Cache/Get": Rule(ENGINES),
    "/kvmesh.v1.Cache/Fetch": Rule(ENGINES),
    "/kvmesh.v1.Cache/Pin": Rule(ENGINES | ADMIN),
    "/kvmesh.v1.Cache/Unpin": Rule(ENGINES | ADMIN),
    "/kvmesh.v1.Cache/Stats": Rule(ADMIN),
    "/kvmesh.v1.Cache/Clear": Rule(ADMIN),
    "/grpc.health.v1.Health/Check": Rule(ANY),
    "/grpc.health.v1.Health/Watch": Rule(ANY),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Rule(ADMIN),
}
NOBODY = Rule(frozenset())


def rule_for(method: str) -> Rule:
    """The rule of an RPC (its full method name); an RPC not in the table admits no one."""
    return TABLE.get(method, NOBODY)


def refusal(method: str, role: str | None, request=None) -> str | None:
    """Why a caller with `role` may not call `method` with `request` (None: it may)."""
    rule = rule_for(method)
    if role is None:
        return f"{method}: the client certificate names no kvmesh role; use one made by `kvmesh certs init`"
    if role not in rule.roles:
        allowed = ", ".join(sorted(rule.roles)) or "no role"
        return f"{method} is not allowed for role {role!r} (allowed: {allowed})"
    if rule.check is not None and request is not None:
        return rule.check(request, role)
    return None


def _guard(fn, method: str):
    """`fn` (a handler's behaviour) behind the table's check of the caller, of the same kind as `fn`."""
    async def check(request, context) -> None:
        message = request if hasattr(request, "ListFields") else None  # a stream's requests are not checked
        text = refusal(method, tls.peer_role(context), message)
        if text is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, text)

    if inspect.isasyncgenfunction(fn):
        async def stream(request, context):
            await check(request, context)
            async for message in fn(request, context):
                yield message
        return stream

    async def unary(request, context):
        await check(request, context)
        result = fn(request, context)
        return await result if inspect.isawaitable(result) else result
    return unary


class RoleInterceptor(grpc.aio.ServerInterceptor):
    """PERMISSION_DENIED for every call whose certificate's role the table does not allow."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guard(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _guard(handler.unary_stream, method), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _guard(handler.stream_unary, method), handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            _guard(handler.stream_stream, method), handler.request_deserializer, handler.response_serializer)
