"""A stub of the gateway's gRPC `Generate`: `max_tokens` messages of one token each at once, then the final
message with usage — for measuring the benchmark's gRPC client without a model in the way.

`python -m kvmesh.services.bench.stub_grpc --port P` runs one in its own process (and prints its address).
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class StubGateway(gateway_pb2_grpc.GatewayServicer):
    """Answers every Generate instantly."""

    async def Generate(self, request, context):
        n = request.sampling.max_tokens or 16
        for _ in range(n):
            yield gateway_pb2.GenerateResponse(request_id=request.request_id, token_ids=[7], text=" x")
        usage = common_pb2.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=n)
        yield gateway_pb2.GenerateResponse(request_id=request.request_id, usage=usage,
                                           finish_reason=common_pb2.FINISH_REASON_LENGTH)


async def serve(port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start a stub gateway on 127.0.0.1; return it and its port.

    gRPC's server cancels (CANCELLED) new calls beyond 1,000 not yet handed to the application by default
    (`grpc.server.max_pending_requests`); a burst of thousands of streams needs the limit raised."""
    server = grpc.aio.server(options=[("grpc.server.max_pending_requests", 1 << 16),
                                      ("grpc.server.max_pending_requests_hard_limit", 1 << 16)])
    gateway_pb2_grpc.add_GatewayServicer_to_server(StubGateway(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


async def _serve_forever(port: int) -> None:
    server, bound = await serve(port)
    print(f"stub gRPC gateway on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    """Run a stub gateway until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(_serve_forever(parser.parse_args().port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
