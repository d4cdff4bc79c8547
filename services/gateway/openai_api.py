"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (both with SSE), /v1/models, /health,
/metrics. A thin layer: OpenAI JSON in, `Gateway.generate()` calls, OpenAI JSON out; errors in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvmesh.services.common import telemetry
from kvmesh.services.common.api_keys import KeyRing
from kvmesh.services.common.rate_limit import TenantLimits
from kvmesh.services.common.errors import InvalidArgumentError, MeshError, NotFoundError
from kvmesh.services.gateway import openai_format as fmt
from kvmesh.services.gateway.body_limit import BodyLimitMiddleware
from kvmesh.services.gateway.http_auth import ApiKeyMiddleware, open_paths
from kvmesh.services.gateway.core import Gateway, GenerateCall, validate
from kvmesh.services.gateway.openai_errors import error_response, stream_error_event, typed_error_response
from kvmesh.services.gateway.openai_choices import Choice, absorb, best, first_of_each, merge
from kvmesh.services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from kvmesh.services.gateway import slo
from kvmesh.services.gateway.request_ids import held
from kvmesh.services.gateway.openai_tokenize import add_token_routes
from kvmesh.services.gateway.tokens import AsyncTokenizer

class OpenAIFrontend:
    """Builds OpenAI responses from gateway streams."""

    def __init__(self, gateway: Gateway, tokenizer: AsyncTokenizer, metrics_renderer: Callable | None = None):
        self.gateway, self.tokenizer, self.metrics_renderer = gateway, tokenizer, metrics_renderer

    def _check_model(self, body: OpenAIRequest) -> None:
        if body.model and body.model not in (self.gateway.card.name, self.gateway.card.path):
            raise NotFoundError(f"model {body.model!r} is not served here; this gateway serves "
                                f"{self.gateway.card.name!r} (GET /v1/models)")
        problem = body.unsupported()
        if problem:
            raise InvalidArgumentError(problem)

    async def _prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            return [await self.tokenizer.encode(p)]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return [await self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in p]

    async def _echoes(self, body: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """The text each prompt's choices begin with: the prompt itself with echo, else nothing."""
        if not body.echo:
            return [""] * len(prompts)
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if len(texts) != len(prompts) or not all(isinstance(t, str) for t in texts):
            texts = [await self.tokenizer.decode(ids) for ids in prompts]
        return texts

    async def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        return await self.tokenizer.encode_chat(body.rendered(), body.add_generation_prompt)

    def _choices(self, body: OpenAIRequest, prompts: list[list[int]], request_id: str,
                 request: Request | None = None, echoes: list[str] | None = None) -> list[Choice]:
        choices = []
        parent = telemetry.extract_metadata(request.headers) if request is not None else None
        arrival_ns = getattr(request.state, "arrival_ns", 0) if request is not None else 0
        slo_objectives = slo.from_headers(request.headers) if request is not None else (None, None)
        for p, ids in enumerate(prompts):
            for j in range(body.num_candidates):
                call = GenerateCall(ids, body.sampling(j), f"{request_id}-{len(choices)}", body.cache_salt or "",
                                    trace_parent=parent, arrival_ns=arrival_ns, api="http")
                call.slo_ttft_s, call.slo_tpot_s = slo_objectives
                choices.append(Choice(len(choices), call, p, echoes[p] if echoes else ""))
        return choices

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body)
        rid = body.request_id or f"cmpl-{uuid.uuid4().hex}"
        prompts = await self._prompts(body)
        choices = self._choices(body, prompts, rid, request, await self._echoes(body, prompts))
        render = fmt.CompletionRenderer(rid, self.gateway.card.name, self.tokenizer.tokenizer)
        return await self._respond(body, choices, render, request)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body)
        rid = body.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        choices = self._choices(body, [await self._chat_prompt(body)], rid, request)
        render = fmt.ChatRenderer(rid, self.gateway.card.name, self.tokenizer.tokenizer)
        return await self._respond(body, choices, render, request)

    def _stream(self, choices: list[Choice]):
        """Every choice's messages, merged, with the choices' request ids held while they run."""
        return held(merge(self.gateway, choices), self.gateway.live_ids, [c.call.request_id for c in choices])

    async def _respond(self, body: OpenAIRequest, choices: list[Choice], render, request: Request):
        self.gateway.drain.check_open()  # a draining gateway refuses with 503 before any header goes out
        for choice in choices:  # fail before streaming starts, so the error gets a real HTTP status
            validate(choice.call, self.gateway.card)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream(choices)
            read = await first_of_each(stream, choices)  # a refusal raises here: a real HTTP status, not an event
            return StreamingResponse(self._sse(choices, read, stream, render, include_usage),
                                     media_type="text/event-stream")
        work = asyncio.create_task(self._collect(choices))
        watch = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client went away: cancel the request on every worker
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                return Response(status_code=499)
        work.result()  # a failed choice raises here: an HTTP error status with a message, never an empty 200
        if body.best_of is not None:  # ranked best first, as vLLM did (and only the best n kept)
            choices = best(choices, body.n, keep_logprobs=body.requested_logprobs() is not None)
        return JSONResponse(await self.tokenizer.run(render.whole, choices))  # decodes every logprob's token

    async def _collect(self, choices: list[Choice]) -> None:
        async for choice, response in self._stream(choices):
            absorb(choice, response)

    async def _sse(self, choices: list[Choice], read: list, stream, render, include_usage: bool
                   ) -> AsyncIterator[str]:
        try:
            for chunk in render.opening(choices):
                yield _event(chunk)
            async for choice, response in _chain(read, stream):
                absorb(choice, response)
                if response.logprobs:  # the logprobs' token strings: many decodes, on the tokenizer's thread
                    yield _event(await self.tokenizer.run(render.chunk, choice, response, include_usage))
                else:
                    yield _event(render.chunk(choice, response, include_usage))
            if include_usage:
                yield _event(render.usage_chunk(choices))
        except Exception as e:  # noqa: BLE001 — the status line is sent: report it in the stream, then end it
            # without [DONE]: a client reading to [DONE] would take the partial output for a complete one
            yield _event(stream_error_event(e))
            return
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"


async def _chain(read: list, stream) -> AsyncIterator:
    for item in read:
        yield item
    async for item in stream:
        yield item


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _no_native_telemetry() -> dict:
    """Turn off FastAPI's own OpenTelemetry spans (newer releases have them): the gateway opens the request's
    root span, `gateway.Generate`, itself, continuing the `traceparent` header."""
    import inspect

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}


FRAMEWORK_MESSAGES = {
    400: "the request body is not valid JSON; send a JSON object with Content-Type: application/json",
    404: "no such path: {path}; the API serves /v1/completions, /v1/chat/completions, /v1/models, /tokenize, "
         "/detokenize, /health and /metrics",
    405: "{method} is not allowed on {path}",
}


def _error_handlers(app: FastAPI) -> None:
    """Every error the app answers, its own and the framework's (unparseable JSON, unknown path, wrong method), in
    OpenAI's shape with a message a person can act on."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = str(first.get("msg", "malformed body")).removeprefix("Value error, ")
        return error_response(400, f"invalid request: {where + ': ' if where else ''}{message}", param=where or None)

    @app.exception_handler(MeshError)
    async def failed(_, exc: MeshError):
        return typed_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def framework(request: Request, exc: StarletteHTTPException):
        message = FRAMEWORK_MESSAGES.get(exc.status_code, str(exc.detail))
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        reply = error_response(exc.status_code, message.format(method=request.method, path=request.url.path), kind)
        reply.headers.update(exc.headers or {})
        return reply


def build_app(frontend: OpenAIFrontend, health: Callable, max_body_bytes: int, keys: KeyRing | None = None,
              metrics_auth: bool = False, limits: TenantLimits | None = None) -> FastAPI:
    """The FastAPI app of the gateway's HTTP port; with keys, every path but the open ones needs one."""
    app = FastAPI(title="kvmesh", docs_url=None, redoc_url=None, **_no_native_telemetry())

    @app.middleware("http")
    async def arrival(request: Request, call_next):
        request.state.arrival_ns = time.time_ns()  # the request's first byte, for TTFT and its root span
        return await call_next(request)

    _error_handlers(app)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await frontend.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await frontend.chat(body, request)

    @app.get("/v1/models")
    async def models():
        card = frontend.gateway.card
        return {"object": "list", "data": [{"id": card.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "kvmesh", "max_model_len": card.max_model_len}]}

    @app.get("/health")
    async def healthy():
        ok, message = await health()
        return JSONResponse({"status": "ok" if ok else "unavailable", "detail": message},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        if frontend.metrics_renderer is None:
            return Response(status_code=404)
        data, content_type = frontend.metrics_renderer()
        return Response(data, media_type=content_type)

    add_token_routes(app, frontend)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    if keys is not None:  # added last, so outermost: nothing (not even the body limit) runs before the key check
        app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=open_paths(metrics_auth), limits=limits)
    return app
