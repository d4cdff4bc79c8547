"""The default OpenAI SSE client: HTTP/1.1 over asyncio streams, keep-alive connections in a pool of our own.

Why not httpx: its per-request cost (about 1.7 ms of CPU for a short stream here) caps one core at a few
hundred arrivals per second and its pool degrades with thousands of waiters; this client does only what a
streamed completion needs — one POST, a status line, chunked or length-delimited SSE — at a small fraction of
that (bench/RESULTS.md), so thousands of streams stay in flight from one process.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from urllib.parse import urlparse

from kvmesh.services.bench.client_base import BenchClient, SseReader, completion_body
from kvmesh.services.bench.datasets import BenchRequest
from kvmesh.services.bench.metrics import RequestResult


_TIMEOUT = getattr(asyncio, "timeout", None)


class ProtocolError(Exception):
    """The server's reply is not HTTP/1.1 as expected."""


class _Body:
    """Reads a response body in pieces as they arrive, by its framing (chunked, Content-Length or until close).

    Chunked bodies are parsed out of a buffer, every complete chunk at once: one read of the socket per burst of
    tokens rather than two awaits per chunk (the client's CPU per request is what caps arrivals per core)."""

    def __init__(self, reader: asyncio.StreamReader, headers: dict[str, str]):
        self.reader = reader
        self.chunked = "chunked" in headers.get("transfer-encoding", "")
        length = headers.get("content-length")
        self.remaining = int(length) if length is not None else None
        self.reusable = (self.chunked or length is not None) and headers.get("connection", "") != "close"
        self.ended = False
        self.buffer = bytearray()
        self.last_seen = False

    async def piece(self) -> bytes:
        """The next bytes of the body; b"" at its end."""
        if self.ended:
            return b""
        if self.chunked:
            return await self._chunks()
        if self.remaining is not None:
            if self.remaining == 0:
                self.ended = True
                return b""
            data = await self.reader.read(min(self.remaining, 1 << 16))
            if not data:
                raise ProtocolError("connection closed inside the body")
            self.remaining -= len(data)
            return data
        data = await self.reader.read(1 << 16)
        self.ended = not data
        return data

    async def _chunks(self) -> bytes:
        if self.last_seen:
            self.ended = True
            return b""
        while True:
            data, self.last_seen = self._parse()
            if self.last_seen:
                self.ended = not data  # the data first; the end on the next call
                return data
            if data:
                return data
            more = await self.reader.read(1 << 16)
            if not more:
                raise ProtocolError("connection closed inside a chunked body")
            self.buffer += more

    def _parse(self) -> tuple[bytes, bool]:
        """Every complete chunk in the buffer, joined, and whether the last (zero-size) chunk was reached."""
        buffer, pieces, at = self.buffer, [], 0
        while True:
            eol = buffer.find(b"\r\n", at)
            if eol < 0:
                break
            size = int(bytes(buffer[at:eol]).split(b";")[0], 16)
            end = eol + 2 + size + 2  # a zero-size chunk is followed by an empty trailer line: the same "\r\n"
            if len(buffer) < end:
                break
            if size == 0:
                del buffer[:end]
                return b"".join(pieces), True
            pieces.append(bytes(buffer[eol + 2:end - 2]))
            at = end
        del buffer[:at]
        return b"".join(pieces), False

    async def drain(self) -> None:
        """Read the rest, so the connection can carry the next request."""
        while await self.piece():
            pass


class HttpClient(BenchClient):
    """OpenAI `/v1/completions` with SSE over plain asyncio; `max_connections` caps open connections."""

    def __init__(self, base_url: str, model: str | None, timeout_s: float, max_connections: int):
        url = urlparse(base_url if "://" in base_url else f"http://{base_url}")
        self.host, self.ssl = url.hostname or "127.0.0.1", ssl.create_default_context() if url.scheme == "https" \
            else None
        self.port = url.port or (443 if self.ssl else 80)
        prefix = url.path.rstrip("/")
        self.path = prefix + ("/completions" if prefix.endswith("/v1") else "/v1/completions")
        self.model, self.timeout_s = model, timeout_s
        self.slots = asyncio.Semaphore(max(1, max_connections))
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                     "Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: ").encode()

    async def _connection(self):
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=1 << 20)

    async def send(self, request: BenchRequest, result: RequestResult) -> None:
        payload = json.dumps(completion_body(request, self.model), separators=(",", ":")).encode()
        start = time.perf_counter()
        try:
            async with self.slots:
                if _TIMEOUT is not None:  # Python 3.11+: no extra task per request, unlike wait_for
                    async with _TIMEOUT(self.timeout_s):
                        await self._exchange(payload, start, result)
                else:  # pragma: no cover
                    await asyncio.wait_for(self._exchange(payload, start, result), self.timeout_s)
        except asyncio.TimeoutError:
            result.error = "timeout"
        except Exception as exc:  # noqa: BLE001 — any transport failure is this request's outcome, not the run's
            result.error = type(exc).__name__
        finally:
            result.e2e_s = time.perf_counter() - start

    async def _exchange(self, payload: bytes, start: float, result: RequestResult) -> None:
        reader, writer = await self._connection()
        keep = False
        try:
            writer.write(self.head + b"%d\r\n\r\n" % len(payload) + payload)
            status, headers = await _read_head(reader)
            body = _Body(reader, headers)
            if status != 200:
                result.error = f"http_{status}"
                await body.drain()
            else:
                await _read_events(body, SseReader(result, start))
            keep = body.ended and body.reusable
        finally:
            if keep:
                self.idle.append((reader, writer))
            else:
                writer.close()

    async def model_ids(self) -> list[str]:
        """GET /v1/models: the ids the server serves (vLLM requires `model` in every request)."""
        reader, writer = await asyncio.wait_for(self._connection(), self.timeout_s)
        try:
            path = self.path.rsplit("/", 1)[0] + "/models"
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
            status, headers = await asyncio.wait_for(_read_head(reader), self.timeout_s)
            body, data = _Body(reader, headers), b""
            while piece := await asyncio.wait_for(body.piece(), self.timeout_s):
                data += piece
        finally:
            writer.close()
        if status != 200:
            raise ProtocolError(f"GET {path} answered {status}")
        return [m["id"] for m in json.loads(data).get("data", [])]

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip().lower()
    return int(parts[1]), headers


async def _read_events(body: _Body, events: SseReader) -> None:
    """Split the body into lines and feed them on; the rest of the body is read so the connection stays usable."""
    pending = b""
    while True:
        data = await body.piece()
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:  # SSE separates events by blank lines: skip them before decoding anything
            if line.strip() and events.line(line.decode("utf-8").rstrip("\r")):
                await body.drain()
                events.finish()
                return
    events.finish()
