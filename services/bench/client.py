"""The two ways a benchmark talks to a mesh: OpenAI `/v1/completions` with SSE over HTTP (httpx), and the gateway's
gRPC `Generate` stream (the generated `kvmesh.v1` stubs). Both fill in a `RequestResult` and never raise for a
failed request: the failure is the result's `error`, named by its status.

Times are taken with `time.perf_counter()` right before the request goes out and as each token-carrying message
is parsed, so the client's own cost sits inside what it reports and must stay small (bench/serve_overhead.py).
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlparse

from kvmesh.services.bench.datasets import BenchRequest
from kvmesh.services.bench.metrics import RequestResult


API_HTTP = "http"
API_GRPC = "grpc"  # the gateway's gRPC API (not the KV transport of that name)
APIS = (API_HTTP, API_GRPC)


class BenchClient:
    """Sends one request at a time per call; many calls run at once on one event loop."""

    api = ""

    async def send(self, request: BenchRequest, result: RequestResult) -> None:
        """Send `request`, streaming, and record its timings and outcome into `result`."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""


class HttpClient(BenchClient):
    """OpenAI completions with `stream`, `stream_options.include_usage` and vLLM's `ignore_eos`; the prompt goes
    as a list of token ids, which the gateway (and vLLM) accept."""

    api = API_HTTP

    def __init__(self, base_url: str, model: str | None, timeout_s: float, max_connections: int):
        try:
            import httpx
        except ImportError:  # a clear message rather than a traceback: httpx is the one HTTP dependency
            raise SystemExit("kvmesh bench serve --api http needs httpx: pip install 'kvmesh[bench]'") from None
        base = base_url.rstrip("/")
        self.url = base + ("/completions" if base.endswith("/v1") else "/v1/completions")
        self.model = model
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
                                      limits=limits)

    def _body(self, request: BenchRequest) -> dict:
        body = {"prompt": request.prompt_ids, "max_tokens": request.output_len, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        if self.model:
            body["model"] = self.model
        return body

    async def send(self, request: BenchRequest, result: RequestResult) -> None:
        start = time.perf_counter()
        try:
            async with self.http.stream("POST", self.url, json=self._body(request)) as response:
                if response.status_code != 200:
                    await response.aread()
                    result.error = f"http_{response.status_code}"
                    return
                await self._read_stream(response, start, result)
        except Exception as exc:  # noqa: BLE001 — any transport failure is this request's outcome, not the run's
            result.error = type(exc).__name__
        finally:
            result.e2e_s = time.perf_counter() - start

    async def _read_stream(self, response, start: float, result: RequestResult) -> None:
        chunks, finished = 0, False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                finished = True
                break
            event = json.loads(data)
            if "error" in event:  # the gateway's error event after the headers went out
                result.error = f"http_{event['error'].get('code', 'stream_error')}"
                return
            if event.get("choices"):
                now = time.perf_counter() - start
                if result.ttft_s is None:
                    result.ttft_s = now
                result.token_times_s.append(now)
                chunks += 1
            usage = event.get("usage")
            if usage:
                result.output_tokens = usage.get("completion_tokens", 0)
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if not finished:  # a stream that ends without [DONE] is incomplete, whatever came before it
            result.error = "incomplete"
        elif not result.output_tokens:
            result.output_tokens = chunks  # a server without usage: one token per chunk, as vLLM's client counts

    async def close(self) -> None:
        await self.http.aclose()


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

    def _request(self, request: BenchRequest):
        from kvmesh.v1 import common_pb2, gateway_pb2

        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
        return gateway_pb2.GenerateRequest(model=self.model, prompt_token_ids=request.prompt_ids, sampling=sampling)

    async def send(self, request: BenchRequest, result: RequestResult) -> None:
        message = self._request(request)
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


def make_client(api: str, base_url: str, model: str | None, timeout_s: float, max_connections: int) -> BenchClient:
    """The client for `--api http|grpc`."""
    if api == API_HTTP:
        return HttpClient(base_url, model, timeout_s, max_connections)
    if api == API_GRPC:
        return GrpcClient(base_url, model, timeout_s)
    raise ValueError(f"unknown api {api!r}: use http or grpc")
