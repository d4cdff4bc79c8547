"""The two ways a benchmark talks to a mesh: OpenAI `/v1/completions` with SSE over HTTP (`http_native`, or
`httpx_client`), and the gateway's gRPC `Generate` stream (the generated `kvmesh.v1` stubs, here). Each fills in
a `RequestResult` and never raises for a failed request: the failure is the result's `error`, named by its status.
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

from kvmesh.services.bench.client_base import BenchClient
from kvmesh.services.bench.datasets import BenchRequest
from kvmesh.services.bench.metrics import RequestResult


API_HTTP = "http"
API_GRPC = "grpc"  # the gateway's gRPC API (not the KV transport of that name)
APIS = (API_HTTP, API_GRPC)


def grpc_target(base_url: str) -> str:
    """`grpc://host:port`, `http://host:port` or a bare `host:port` → `host:port`."""
    if "://" in base_url:
        parsed = urlparse(base_url)
        return f"{parsed.hostname}:{parsed.port}"
    return base_url.rstrip("/")


class GrpcClient(BenchClient):
    """The gateway's `Generate` stream; token ids go as `prompt_token_ids`. Streams are spread over a few
    channels, each its own connection, so thousands of them do not queue behind one HTTP/2 connection's limit."""

    api = API_GRPC

    def __init__(self, base_url: str, model: str | None, timeout_s: float, num_channels: int = 4):
        import grpc

        from kvmesh.v1 import gateway_pb2_grpc

        self.grpc = grpc
        target = grpc_target(base_url)
        # a local subchannel pool gives each channel its own connection instead of one shared socket
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
        self.channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(num_channels)]
        self.stubs = [gateway_pb2_grpc.GatewayStub(c) for c in self.channels]
        self.model, self.timeout_s, self.next = model or "", timeout_s, 0

    def request_message(self, request: BenchRequest):
        """The `GenerateRequest` for `request`."""
        from kvmesh.v1 import common_pb2, gateway_pb2

        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
        return gateway_pb2.GenerateRequest(model=self.model, prompt_token_ids=request.prompt_ids, sampling=sampling)

    async def send(self, request: BenchRequest, result: RequestResult) -> None:
        message = self.request_message(request)
        self.next = (self.next + 1) % len(self.stubs)
        stub = self.stubs[self.next]
        start = time.perf_counter()
        try:
            finished, tokens = False, 0
            async for response in stub.Generate(message, timeout=self.timeout_s):
                if response.token_ids:
                    now = time.perf_counter() - start
                    if result.ttft_s is None:
                        result.ttft_s = now
                    result.token_times_s.append(now)
                    tokens += len(response.token_ids)
                if response.finish_reason:
                    finished = True
                    result.cached_tokens = response.usage.cached_tokens
            result.output_tokens = tokens
            if not finished:
                result.error = "incomplete"
        except self.grpc.aio.AioRpcError as exc:
            result.error = exc.code().name
        except Exception as exc:  # noqa: BLE001 — any transport failure is this request's outcome
            result.error = type(exc).__name__
        finally:
            result.e2e_s = time.perf_counter() - start

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def make_client(api: str, base_url: str, model: str | None, timeout_s: float, max_connections: int,
                http_client: str = "native") -> BenchClient:
    """The client for `--api http|grpc` (`http_client`: the native asyncio one, or httpx)."""
    if api == API_HTTP and http_client == "httpx":
        from kvmesh.services.bench.httpx_client import HttpxClient

        return HttpxClient(base_url, model, timeout_s, max_connections)
    if api == API_HTTP:
        from kvmesh.services.bench.http_native import HttpClient

        return HttpClient(base_url, model, timeout_s, max_connections)
    if api == API_GRPC:
        return GrpcClient(base_url, model, timeout_s)
    raise ValueError(f"unknown api {api!r}: use http or grpc")
