"""What `kvmesh bench serve` itself costs: TTFT it adds over a bare socket, and the arrival rate one core sustains.

    python bench/serve_overhead.py [--quick] [--out FILE.json] [--results bench/RESULTS.md]

Against the stub OpenAI server (`python -m kvmesh.services.bench.stub`: every token at once), in its own process
pinned to the second core while this process is pinned to the first:
- TTFT overhead: requests one at a time, alternating in rounds between a benchmark HTTP client (the native
  asyncio one, then httpx: request building, SSE parsing, the timing code) and a bare asyncio socket that writes
  a prebuilt request and stops its clock at the first token's bytes. Overhead = p50(client TTFT) − p50(bare
  TTFT). Goal < 1 ms.
- Arrivals: `run_load` at a Poisson rate, many requests; sustained when the achieved send rate is >= 95 % of the
  asked one and the p99 lag of sends behind their schedule stays below 100 ms. Once with the HTTP client (each
  request a real stream) and once with a client that does nothing (the dispatcher's own ceiling). Goal >= 2,000/s.
  The same for the gRPC client against a stub gateway (`python -m kvmesh.services.bench.stub_grpc`), its TTFT
  against the bare `Generate` call on the same channel. The CPU time per request gives the rate one whole core
  would sustain (the ceiling); the share of the core the process got shows when a shared machine, not the
  client, held it back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kvmesh.services.bench.client import GrpcClient
from kvmesh.services.bench.client_base import BenchClient
from kvmesh.services.bench.http_native import HttpClient
from kvmesh.services.bench.httpx_client import HttpxClient
from kvmesh.services.bench.datasets import BenchRequest, Session
from kvmesh.services.bench.metrics import RequestResult, percentile
from kvmesh.services.bench.progress import Progress
from kvmesh.services.bench.serve import LoadShape, run_load
from machine import machine  # bench/machine.py (this script's folder is on sys.path)

PROMPT = list(range(100, 164))
CLIENT_NAMES = {HttpClient: "native", HttpxClient: "httpx"}
OUTPUT_TOKENS = 4


def start_stub(core: int, module: str = "kvmesh.services.bench.stub") -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", "0"], stdout=subprocess.PIPE, text=True)
    os.sched_setaffinity(proc.pid, {core})
    line = proc.stdout.readline()
    return proc, int(line.rsplit(":", 1)[1])


async def bare_ttfts(port: int, n: int) -> list[float]:
    """TTFT with nothing but a socket: the server's and the loopback's share of what the client measures."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": OUTPUT_TOKENS, "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        writer.write(request)
        buffer, first = b"", None
        while not buffer.endswith(b"0\r\n\r\n"):
            buffer += await reader.read(65536)
            if first is None and b'"choices": [{' in buffer:
                first = time.perf_counter() - start
        out.append(first)
    writer.close()
    return out


async def client_ttfts(client: BenchClient, n: int) -> list[float]:
    out = []
    for _ in range(n):
        result = RequestResult()
        await client.send(BenchRequest(PROMPT, OUTPUT_TOKENS), result)
        if not result.ok:
            raise RuntimeError(f"the stub failed a request: {result.error}")
        out.append(result.ttft_s)
    return out


async def ttft_overhead(port: int, rounds: int, per_round: int, client_cls=HttpClient) -> dict:
    client = client_cls(f"http://127.0.0.1:{port}", None, timeout_s=30, max_connections=1)
    bare, ours = [], []
    try:
        await client_ttfts(client, 20)  # warm the connection and the code paths
        await bare_ttfts(port, 20)
        for _ in range(rounds):  # alternating, so drift in the machine's load hits both alike
            ours += await client_ttfts(client, per_round)
            bare += await bare_ttfts(port, per_round)
    finally:
        await client.close()
    return {"client": CLIENT_NAMES[client_cls], "requests": len(ours), "bare_ttft_p50_ms": percentile(bare, 50) * 1e3,
            "client_ttft_p50_ms": percentile(ours, 50) * 1e3, "bare_ttft_p90_ms": percentile(bare, 90) * 1e3,
            "client_ttft_p90_ms": percentile(ours, 90) * 1e3,
            "overhead_p50_ms": (percentile(ours, 50) - percentile(bare, 50)) * 1e3}


class NullClient(BenchClient):
    """Answers at once without a network: what is left is the dispatcher and the bookkeeping."""

    async def send(self, request, result):
        result.ttft_s = result.e2e_s = 0.0
        result.output_tokens = request.output_len


async def arrivals(client: BenchClient, rate: float, n: int) -> dict:
    sessions = [Session([BenchRequest(PROMPT, OUTPUT_TOKENS, session=i)]) for i in range(n)]
    cpu, wall = time.process_time(), time.perf_counter()
    outcome = await run_load(sessions, client, LoadShape(request_rate=rate, seed=1),
                             progress=Progress(n, enabled=False))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    starts = sorted(r.start_s for r in outcome.results)
    lag = [r.start_s - r.scheduled_s for r in outcome.results]
    achieved = (n - 1) / (starts[-1] - starts[0])
    return {"asked_rps": rate, "requests": n, "achieved_send_rps": achieved,
            "sustained": achieved >= 0.95 * rate and percentile(lag, 99) < 0.1,
            "send_lag_p50_ms": percentile(lag, 50) * 1e3, "send_lag_p99_ms": percentile(lag, 99) * 1e3,
            "completed": outcome.summary["completed"], "failed": outcome.summary["failed"],
            "errors": outcome.summary["errors"],
            "completed_rps": outcome.summary["request_rps"], "cpu_s_per_request_ms": cpu / n * 1e3,
            # the CPU this process got: well under 100 % while behind schedule means the core was shared
            "core_share_pct": 100 * cpu / wall, "cpu_bound_ceiling_rps": n / cpu}


async def bare_grpc_ttfts(client: GrpcClient, n: int) -> list[float]:
    """TTFT of the same channel and request with no bookkeeping: what the gRPC stack itself costs."""
    message = client.request_message(BenchRequest(PROMPT, OUTPUT_TOKENS))
    out = []
    for _ in range(n):
        start = time.perf_counter()
        first = None
        async for response in client.stubs[0].Generate(message, timeout=30):
            if first is None and response.token_ids:
                first = time.perf_counter() - start
        out.append(first)
    return out


async def grpc_overhead(port: int, args: argparse.Namespace) -> dict:
    client = GrpcClient(f"127.0.0.1:{port}", None, timeout_s=30, num_channels=1)
    bare, ours = [], []
    try:
        await client_ttfts(client, 20)
        for _ in range(args.rounds):
            ours += await client_ttfts(client, args.per_round)
            bare += await bare_grpc_ttfts(client, args.per_round)
        runs = []
        for rate in args.rates:
            runs.append({"client": "grpc", **await arrivals(client, rate, int(rate * args.seconds))})
    finally:
        await client.close()
    return {"ttft": {"client": "grpc", "requests": len(ours), "bare_ttft_p50_ms": percentile(bare, 50) * 1e3,
                     "client_ttft_p50_ms": percentile(ours, 50) * 1e3, "bare_ttft_p90_ms": percentile(bare, 90) * 1e3,
                     "client_ttft_p90_ms": percentile(ours, 90) * 1e3,
                     "overhead_p50_ms": (percentile(ours, 50) - percentile(bare, 50)) * 1e3}, "arrivals": runs}


async def measure(port: int, args: argparse.Namespace) -> dict:
    row = {"ttft": [await ttft_overhead(port, args.rounds, args.per_round, cls) for cls in CLIENT_NAMES],
           "arrivals": []}
    for rate in args.rates:
        for cls in ([HttpClient, HttpxClient] if rate <= args.httpx_max_rate else [HttpClient]):
            client = cls(f"http://127.0.0.1:{port}", None, timeout_s=60, max_connections=args.connections)
            try:
                row["arrivals"].append({"client": CLIENT_NAMES[cls],
                                        **await arrivals(client, rate, int(rate * args.seconds))})
            finally:
                await client.close()
        row["arrivals"].append({"client": "none", **await arrivals(NullClient(), rate, int(rate * args.seconds))})
    return row



def results_table(row: dict, command: str) -> str:
    cpu = row["machine"]
    lines = [f"\n## `kvmesh bench serve` overhead ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
             f"`{command}`\n",
             f"CPU: {cpu.get('Model name', '?')}, {cpu.get('CPU(s)', '?')} CPUs; 1-minute load average at the "
             f"start {cpu['loadavg']:.1f}. The benchmark pinned to core 0, the stub server to core 1.\n",
             "| client | TTFT p50 client / bare socket | TTFT p90 client / bare socket | **TTFT added (p50)** "
             "| goal |", "| --- | --- | --- | --- | --- |"]
    for t in row["ttft"]:
        lines.append(f"| {t['client']} ({t['requests']} requests, one at a time) | {t['client_ttft_p50_ms']:.3f} / "
                     f"{t['bare_ttft_p50_ms']:.3f} ms | {t['client_ttft_p90_ms']:.3f} / {t['bare_ttft_p90_ms']:.3f} ms "
                     f"| **{t['overhead_p50_ms']:.3f} ms** | < 1 ms |")
    lines += ["",
             "| client | asked req/s | sent req/s | send lag p50 / p99 ms | completed / failed | completed req/s | "
             "CPU ms / request | CPU-bound ceiling req/s | core share % | sustained |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in row["arrivals"]:
        lines.append(f"| {a['client']} | {a['asked_rps']:g} | {a['achieved_send_rps']:.0f} | "
                     f"{a['send_lag_p50_ms']:.2f} / {a['send_lag_p99_ms']:.2f} | {a['completed']} / {a['failed']} | "
                     f"{a['completed_rps']:.0f} | {a['cpu_s_per_request_ms']:.3f} | {a['cpu_bound_ceiling_rps']:.0f} | "
                     f"{a['core_share_pct']:.0f} | {a['sustained']} |")
    lines += ["", f"<details><summary>lscpu flags</summary>\n\n`{cpu.get('Flags', '')}`\n\n</details>", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rates", default="1000,2000,4000", help="arrival rates to try, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each arrival run")
    parser.add_argument("--connections", type=int, default=512, help="the HTTP client's connection pool")
    parser.add_argument("--httpx-max-rate", type=float, default=500,
                        help="run the httpx client only up to this rate (above, it falls behind for minutes)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, rates 500,2000, 1 s each")
    parser.add_argument("--out", help="write the JSON row here")
    parser.add_argument("--results", help="append a table to this markdown file (e.g. bench/RESULTS.md)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rates, args.seconds = 3, "500,2000", 1.0
    args.rates = [float(r) for r in args.rates.split(",")]
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[0]})
    import uvloop

    stub, port = start_stub(cores[-1])
    try:
        row = uvloop.run(measure(port, args))
    finally:
        stub.terminate()
        stub.wait(timeout=10)
    stub, port = start_stub(cores[-1], "kvmesh.services.bench.stub_grpc")
    try:
        grpc_row = uvloop.run(grpc_overhead(port, args))
        row["ttft"].append(grpc_row["ttft"])
        row["arrivals"] += grpc_row["arrivals"]
    finally:
        stub.terminate()
        stub.wait(timeout=10)
    row["machine"] = machine()
    print(json.dumps({**row, "machine": {k: v for k, v in row["machine"].items() if k != "Flags"}}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    if args.results:
        with open(args.results, "a") as f:
            f.write(results_table(row, "python " + " ".join(sys.argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
