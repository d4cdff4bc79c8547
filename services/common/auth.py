"""The server skeleton's authentication interceptor: with a key ring, every RPC but the standard health check
needs `authorization: Bearer <key>` metadata naming a valid key, or ends UNAUTHENTICATED before its handler runs
or its request is read; with rate limits, a tenant over its limit gets RESOURCE_EXHAUSTED (and `retry-after`
trailing metadata). The key's tenant is put in `api_keys.TENANT` for the handler."""

from __future__ import annotations

import grpc

from kvmesh.services.common.api_keys import TENANT, KeyRing
from kvmesh.services.common.errors import RETRY_AFTER_KEY
from kvmesh.services.common.rate_limit import TenantLimits

#: Open to anyone, as the HTTP API's /health: load balancers and `kvmesh up` probe it without a key.
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
METADATA_KEY = "authorization"
UNAUTHENTICATED_MESSAGE = ("missing or invalid API key: send the metadata 'authorization: Bearer <key>' "
                           "with a key the gateway was given (--api-key, --api-key-file)")


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
             message: str = UNAUTHENTICATED_MESSAGE, trailers: tuple = ()) -> grpc.RpcMethodHandler:
    """A handler of the same kind as handler that only answers code with message."""
    async def refuse(_request, context):
        await context.abort(code, message, trailing_metadata=trailers)

    async def refuse_stream(_request, context):
        await context.abort(code, message, trailing_metadata=trailers)
        yield  # pragma: no cover — an async generator, as streaming handlers are

    # no deserializer: the request's bytes are never parsed for a caller that is not let in
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any call without a valid key, RESOURCE_EXHAUSTED for a tenant over its rate limit;
    sets `TENANT` for those let in."""

    def __init__(self, keys: KeyRing, limits: TenantLimits | None = None):
        self.keys, self.limits = keys, limits

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        value = next((v for k, v in (details.invocation_metadata or ()) if k == METADATA_KEY), None)
        tenant = self.keys.tenant_of(value if isinstance(value, str) else None)
        if tenant is None:
            return _refusal(handler)
        wait_s = self.limits.take(tenant) if self.limits is not None else 0.0
        if wait_s > 0:
            return _refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, self.limits.message(tenant, wait_s),
                            ((RETRY_AFTER_KEY, str(self.limits.retry_after(wait_s))),))
        TENANT.set(tenant)  # the handler runs in this task: it sees the tenant
        return handler
