"""The OpenAI SSE client on httpx: the reference implementation, for servers the native client cannot reach
(proxies, HTTP/2). httpx costs about 1.7 ms of CPU per streamed request on this machine, so it tops out at a
few hundred requests per second per core (bench/RESULTS.md); the native client is the default."""

from __future__ import annotations

import time

from kvmesh.services.bench.client_base import BenchClient, SseReader, completion_body
from kvmesh.services.bench.datasets import BenchRequest
from kvmesh.services.bench.metrics import RequestResult


def completions_url(base_url: str) -> str:
    """`http://h:p` or `http://h:p/v1` → `http://h:p/v1/completions`."""
    base = base_url.rstrip("/")
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


class HttpxClient(BenchClient):
    """OpenAI `/v1/completions` with SSE through `httpx.AsyncClient`."""

    def __init__(self, base_url: str, model: str | None, timeout_s: float, max_connections: int):
        try:
            import httpx
        except ImportError:  # a clear message rather than a traceback
            raise SystemExit("--http-client httpx needs httpx: pip install 'kvmesh[bench]'") from None
        self.url, self.model = completions_url(base_url), model
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
                                      limits=limits)

    async def send(self, request: BenchRequest, result: RequestResult) -> None:
        start = time.perf_counter()
        try:
            async with self.http.stream("POST", self.url, json=completion_body(request, self.model)) as response:
                if response.status_code != 200:
                    await response.aread()
                    result.error = f"http_{response.status_code}"
                    return
                reader, ended = SseReader(result, start), False
                async for line in response.aiter_lines():  # read to the end, so the connection is kept
                    ended = ended or reader.line(line)
                reader.finish()
        except Exception as exc:  # noqa: BLE001 — any transport failure is this request's outcome, not the run's
            result.error = type(exc).__name__
        finally:
            result.e2e_s = time.perf_counter() - start

    async def close(self) -> None:
        await self.http.aclose()
