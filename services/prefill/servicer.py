"""The Prefill gRPC service: thin — protobuf in, the worker's domain call, protobuf out."""

from __future__ import annotations

from kvmesh.services.common.channels import call_timeout
from kvmesh.v1 import prefill_pb2_grpc


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker, prefill_timeout_s: float):
        self.worker = worker
        self.prefill_timeout_s = prefill_timeout_s

    async def Prefill(self, request, context):
        return await self.worker.prefill(request, call_timeout(context, self.prefill_timeout_s))

    async def Stats(self, request, context):
        return self.worker.stats()
