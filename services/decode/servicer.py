"""The Decode gRPC service: thin — protobuf in, the worker's domain call, protobuf out."""

from __future__ import annotations

from kvmesh.services.common.channels import call_timeout
from kvmesh.services.decode.load import worker_stats
from kvmesh.v1 import decode_pb2, decode_pb2_grpc


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker, prefill_timeout_s: float):
        self.worker = worker
        self.prefill_timeout_s = prefill_timeout_s

    async def Generate(self, request, context):
        async for response in self.worker.generate(request, call_timeout(context, self.prefill_timeout_s)):
            yield response

    async def Abort(self, request, context):
        return decode_pb2.DecodeAbortReply(found=await self.worker.abort(request.request_id))

    async def Stats(self, request, context):
        return worker_stats(self.worker)
