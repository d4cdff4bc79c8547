"""API keys on the HTTP API: an ASGI middleware, outermost, so a request without a valid
`Authorization: Bearer <key>` header gets 401 in OpenAI's error shape before any route runs or any body byte is
read. `/health` stays open (and `/metrics`, unless `--metrics-auth`). The key's tenant is set in
`api_keys.TENANT` for the request, as the gRPC interceptor does; a tenant over its rate limit gets 429 with
Retry-After."""

from __future__ import annotations

from kvmesh.services.common.api_keys import TENANT, KeyRing
from kvmesh.services.common.rate_limit import TenantLimits
from kvmesh.services.gateway.openai_errors import error_response

MESSAGE = ("missing or invalid API key: send the header 'Authorization: Bearer <key>' with a key the gateway was "
           "given (--api-key, --api-key-file)")


class ApiKeyMiddleware:
    """401 for every HTTP request without a valid key, but for the open paths; 429 over a tenant's rate limit."""

    def __init__(self, app, keys: KeyRing, open_paths: tuple[str, ...] = ("/health",),
                 limits: TenantLimits | None = None):
        self.app, self.keys, self.open_paths, self.limits = app, keys, open_paths, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)  # lifespan events carry no request
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        tenant = self.keys.tenant_of(header.decode("latin-1"))
        if tenant is None and scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation
        if tenant is None:
            response = error_response(401, MESSAGE, "invalid_request_error")
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        wait_s = self.limits.take(tenant) if self.limits is not None else 0.0
        if wait_s > 0:
            response = error_response(429, self.limits.message(tenant, wait_s), "rate_limit_error")
            response.headers["Retry-After"] = str(self.limits.retry_after(wait_s))
            return await response(scope, receive, send)
        TENANT.set(tenant)  # the route runs in this context (and its tasks copy it)
        return await self.app(scope, receive, send)


def open_paths(metrics_auth: bool) -> tuple[str, ...]:
    """The paths served without a key."""
    return ("/health",) if metrics_auth else ("/health", "/metrics")
