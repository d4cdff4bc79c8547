"""The Gateway gRPC service: GenerateRequest in, the domain's stream out, GenerateResponse messages back."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from kvmesh.services.common import telemetry
from kvmesh.services.gateway.core import Gateway, GatewayError, GenerateCall
from kvmesh.v1 import gateway_pb2, gateway_pb2_grpc

LONG_TEXT = 64 * 1024  # tokenise text longer than this off the event loop


async def tokenize(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of text; long text is tokenised in a thread so the loop keeps serving."""
    if len(text) > LONG_TEXT:
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Thin: validate the envelope, call the domain, relay its stream."""

    def __init__(self, gateway: Gateway, tokenizer):
        self.gateway, self.tokenizer = gateway, tokenizer
        self.created = int(time.time())

    def _check_model(self, model: str) -> None:
        if model and model not in (self.gateway.card.name, self.gateway.card.path):
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"model {model!r} is not served here; this gateway "
                                                          f"serves {self.gateway.card.name!r} (ListModels)")

    async def _call(self, request: gateway_pb2.GenerateRequest, context=None) -> GenerateCall:
        self._check_model(request.model)
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT,
                               "set exactly one of prompt and prompt_token_ids"
                               + (" (both were set)" if request.prompt else " (neither was set)"))
        ids = list(request.prompt_token_ids) or await tokenize(self.tokenizer, request.prompt)
        parent = telemetry.extract_metadata(context.invocation_metadata()) if context is not None else None
        return GenerateCall(ids, request.sampling, request.request_id or uuid.uuid4().hex, request.cache_salt,
                            trace_parent=parent)

    async def Generate(self, request, context):
        arrival_ns = time.time_ns()
        try:
            call = await self._call(request, context)
            call.arrival_ns = arrival_ns
            async for out in self.gateway.generate(call, context.time_remaining()):
                yield gateway_pb2.GenerateResponse(
                    request_id=call.request_id, token_ids=out.token_ids, text=out.text, logprobs=out.logprobs,
                    finish_reason=out.finish_reason, usage=out.usage if out.HasField("usage") else None,
                    timings=out.timings if out.HasField("timings") else None)
        except GatewayError as e:
            await context.abort(e.code, e.message)

    async def Tokenize(self, request, context):
        try:
            self._check_model(request.model)
        except GatewayError as e:
            await context.abort(e.code, e.message)
        ids = await tokenize(self.tokenizer, request.text, request.add_special_tokens)
        return gateway_pb2.TokenizeResponse(token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))

    async def ListModels(self, request, context):
        card = self.gateway.card
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ModelInfo(
            id=card.name, max_model_len=card.max_model_len, created=self.created)])
