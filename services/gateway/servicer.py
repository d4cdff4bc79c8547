"""The Gateway gRPC service: GenerateRequest in, the domain's stream out, GenerateResponse messages back.

Thin: errors are raised as the typed errors every service raises, and the server skeleton's interceptor turns
them into statuses; text is tokenised off the event loop (`AsyncTokenizer`).
"""

from __future__ import annotations

import time
import uuid

from kvmesh.services.common import telemetry
from kvmesh.services.common.errors import InvalidArgumentError, NotFoundError
from kvmesh.services.gateway.core import Gateway, GenerateCall
from kvmesh.services.gateway import slo
from kvmesh.services.gateway.request_ids import held
from kvmesh.services.gateway.tokens import AsyncTokenizer
from kvmesh.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Thin: validate the envelope, call the domain, relay its stream."""

    def __init__(self, gateway: Gateway, tokenizer: AsyncTokenizer):
        self.gateway, self.tokenizer = gateway, tokenizer
        self.created = int(time.time())

    def _check_model(self, model: str) -> None:
        if model and model not in (self.gateway.card.name, self.gateway.card.path):
            raise NotFoundError(f"model {model!r} is not served here; this gateway serves "
                                f"{self.gateway.card.name!r} (ListModels)")

    async def _call(self, request: gateway_pb2.GenerateRequest, context=None) -> GenerateCall:
        self._check_model(request.model)
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise InvalidArgumentError("set exactly one of prompt and prompt_token_ids"
                                       + (" (both were set)" if request.prompt else " (neither was set)"))
        ids = list(request.prompt_token_ids) or await self.tokenizer.encode(request.prompt)
        parent = telemetry.extract_metadata(context.invocation_metadata()) if context is not None else None
        ttft_s, tpot_s = slo.from_request(request)
        return GenerateCall(ids, request.sampling, request.request_id or uuid.uuid4().hex, request.cache_salt,
                            trace_parent=parent, slo_ttft_s=ttft_s, slo_tpot_s=tpot_s)

    async def Generate(self, request, context):
        """Stream one request's tokens, as the decode worker produces them."""
        arrival_ns = time.time_ns()
        call = await self._call(request, context)
        call.arrival_ns = arrival_ns
        stream = held(self.gateway.generate(call, context.time_remaining()), self.gateway.live_ids, [call.request_id])
        try:
            async for out in stream:
                yield gateway_pb2.GenerateResponse(
                    request_id=call.request_id, token_ids=out.token_ids, text=out.text, logprobs=out.logprobs,
                    finish_reason=out.finish_reason, usage=out.usage if out.HasField("usage") else None,
                    timings=out.timings if out.HasField("timings") else None)
        finally:
            await stream.aclose()  # now, not when collected: the request id is free once the call has ended

    async def Tokenize(self, request, context):
        """The token ids and token strings of a text."""
        self._check_model(request.model)
        ids = await self.tokenizer.encode(request.text, request.add_special_tokens)
        return gateway_pb2.TokenizeResponse(token_ids=ids, tokens=await self.tokenizer.tokens(ids))

    async def ListModels(self, request, context):
        """The one model this gateway serves."""
        card = self.gateway.card
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ModelInfo(
            id=card.name, max_model_len=card.max_model_len, created=self.created)])
