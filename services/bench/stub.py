"""An OpenAI `/v1/completions` server that streams `max_tokens` SSE chunks at once (or after set delays), for
testing the benchmark client and measuring its own overhead without a model in the way.

Plain asyncio HTTP/1.1 with keep-alive and chunked replies, so the server costs far less than the client it
measures. Each request's send times (`time.perf_counter()` as each chunk was written) are kept in `sent`, so an
in-process test can check the client's clock against the server's. `python -m kvmesh.services.bench.stub --port P`
runs one in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


class StubOpenAI:
    """Serves POST /v1/completions (streaming); `fail_status` answers every request with that HTTP status, and
    `cut_after` ends every stream after that many tokens without `[DONE]` (a server that died mid-stream)."""

    def __init__(self, first_token_delay_s: float = 0.0, itl_s: float = 0.0, fail_status: int | None = None,
                 keep_times: bool = True, cut_after: int | None = None):
        self.first_token_delay_s, self.itl_s, self.fail_status = first_token_delay_s, itl_s, fail_status
        self.cut_after = cut_after
        self.gate: asyncio.Event | None = None  # when set up, every stream waits for it before its first token
        self.num_waiting = 0
        self.keep_times = keep_times
        self.sent: list[list[float]] = []  # per request, when each token chunk was written
        self.bodies: list[dict] = []
        self.server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.num_connections = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; return the port."""
        self.server = await asyncio.start_server(self._connection, host, port, backlog=4096)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close the connections."""
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):  # wait_closed waits for open connections on Python 3.12+
                writer.close()
            await self.server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.num_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if head.startswith(b"GET /v1/models"):
                    payload = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(payload), payload))
                    continue
                body = json.loads(await reader.readexactly(length)) if length else {}
                await self._respond(body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, body: dict, writer: asyncio.StreamWriter) -> None:
        if self.fail_status is not None:
            payload = json.dumps({"error": {"message": "stub failure", "code": self.fail_status}}).encode()
            writer.write(b"HTTP/1.1 %d Error\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (self.fail_status, len(payload), payload))
            await writer.drain()
            return
        if self.keep_times:
            self.bodies.append(body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        times: list[float] = []
        num_tokens = int(body.get("max_tokens") or 16)
        if self.gate is not None:
            await writer.drain()
            self.num_waiting += 1
            await self.gate.wait()
        for i in range(num_tokens):
            delay = self.first_token_delay_s if i == 0 else self.itl_s
            if delay:
                await asyncio.sleep(delay)
            _chunk(writer, {"object": "text_completion", "choices": [{"index": 0, "text": " x",
                                                                        "finish_reason": None}]})
            times.append(time.perf_counter())
            await writer.drain()
            if self.cut_after is not None and i + 1 >= self.cut_after:
                writer.write(b"0\r\n\r\n")
                return
        prompt = body.get("prompt")
        usage = {"prompt_tokens": len(prompt) if isinstance(prompt, list) else 1, "completion_tokens": num_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        _chunk(writer, {"object": "text_completion", "choices": [], "usage": usage})
        writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()
        if self.keep_times:
            self.sent.append(times)


def _chunk(writer: asyncio.StreamWriter, event: dict) -> None:
    data = b"data: " + json.dumps(event).encode() + b"\n\n"
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


async def _serve_forever(port: int) -> None:
    stub = StubOpenAI(keep_times=False)
    bound = await stub.start(port=port)
    print(f"stub OpenAI server on http://127.0.0.1:{bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    """Run a stub server until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(_serve_forever(parser.parse_args().port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
