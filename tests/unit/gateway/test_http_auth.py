"""The HTTP API's key check, on an ASGI app of its own: refused requests never reach a route or have a body byte
read, admitted ones carry their tenant, /health (and /metrics unless asked) stay open."""

import asyncio
import json

from kvmesh.services.common.api_keys import TENANT, KeyRing
from kvmesh.services.common.rate_limit import TenantLimits
from kvmesh.services.gateway.http_auth import ApiKeyMiddleware, open_paths


class App:
    """Records what reached it: the path and the tenant it saw."""

    def __init__(self):
        self.seen = []

    async def __call__(self, scope, receive, send):
        self.seen.append((scope["path"], TENANT.get()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def request(middleware, path: str, authorization: str | None = None):
    """(status, headers, JSON or text, body bytes read) of one request through middleware."""
    headers = [(b"authorization", authorization.encode())] if authorization else []
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}
    sent, reads = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body, len(reads)


def test_a_missing_or_wrong_key_is_401_before_the_route_and_before_the_body():
    app = App()
    middleware = ApiKeyMiddleware(app, KeyRing(("k1",)), open_paths(metrics_auth=True))
    for authorization in (None, "Bearer k2", "k1", "Bearer k1x"):
        status, headers, body, reads = request(middleware, "/v1/completions", authorization)
        assert (status, reads) == (401, 0)
        assert headers[b"www-authenticate"] == b"Bearer"
        assert json.loads(body)["error"]["code"] == 401
    assert request(middleware, "/metrics")[0] == 401
    assert app.seen == []


def test_open_paths_and_a_valid_key_reach_the_app_with_the_tenant_set(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1 team-a\n")
    app = App()
    middleware = ApiKeyMiddleware(app, KeyRing((), str(keys)), open_paths(metrics_auth=False))
    assert request(middleware, "/health")[0] == request(middleware, "/metrics")[0] == 200
    assert request(middleware, "/v1/models", "Bearer k1")[0] == 200
    assert app.seen == [("/health", None), ("/metrics", None), ("/v1/models", "team-a")]


def test_over_the_rate_limit_is_429_with_retry_after():
    clock = iter(range(1000)).__next__  # a second passes per request: far below one token a minute
    middleware = ApiKeyMiddleware(App(), KeyRing(("k1",)), limits=TenantLimits(1, 1, clock=lambda: clock() / 100))
    assert request(middleware, "/v1/models", "Bearer k1")[0] == 200
    status, headers, body, reads = request(middleware, "/v1/models", "Bearer k1")
    assert (status, reads) == (429, 0) and int(headers[b"retry-after"]) >= 59
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
