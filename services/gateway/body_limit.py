"""The HTTP body limit, enforced on the bytes actually read: an ASGI middleware that reads a request's body (in
whatever framing: Content-Length or chunked) up to `--max-body-bytes` and answers 413 at the first byte past it,
without reading on. A declared Content-Length over the limit is refused before any body byte is read. The body,
once read, is replayed to the app; later `receive` calls (disconnect detection) go to the connection."""

from __future__ import annotations

from kvmesh.services.gateway.openai_errors import error_response


def too_large(size: str | int, limit: int):
    return error_response(413, f"request body of {size} bytes exceeds the limit of {limit} bytes "
                               "(KVMESH_MAX_BODY_BYTES)")


class BodyLimitMiddleware:
    """413 for an HTTP request whose body is, or would be, over `max_body_bytes`."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await too_large(length, self.max_body_bytes)(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await too_large(f"more than {self.max_body_bytes}", self.max_body_bytes)(scope, receive, send)
            messages.append(message)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        replay = [{"type": "http.request", "body": body, "more_body": False}] if messages[-1]["type"] == \
            "http.request" else messages[-1:]

        async def replayed():
            return replay.pop(0) if replay else await receive()

        return await self.app(scope, replayed, send)
