"""What the mesh adds on top of the model: the gateway's cost per token, and what a request waits beyond compute.

    python bench/overhead.py [--model PATH] [--quick] [--out FILE.json] [--results bench/RESULTS.md]

Starts a whole mesh (`kvmesh up`'s children) and measures, in the same run:
- inter-token latency (ITL) seen by a client through the gateway, against ITL seen on the decode worker's own
  stream (the same request shape sent straight to the decode worker the scheduler picks), alternating the two;
- the time to first token (TTFT) of a single request on an idle mesh, against the prefill worker's own compute
  time for that prompt (reported by the worker in the last message's Timings).
Goals: gateway ITL / decode ITL <= 1.05 at p50; (TTFT - prefill compute) / prefill compute <= 0.10 on the `small`
preset with a 1,024-token prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import grpc

from kvmesh.services import launcher
from kvmesh.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, scheduler_pb2,
                       scheduler_pb2_grpc)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def timed(stream) -> tuple[list[float], object]:
    """Arrival times of a stream's messages that carry tokens, and its last message."""
    times, last = [], None
    start = time.perf_counter()
    for message in stream:
        if message.token_ids:
            times.append(time.perf_counter() - start)
        last = message
    return times, last


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


class Bench:
    def __init__(self, gateway: str, scheduler: str, prompt_ids: list[int], output_tokens: int):
        self.gateway = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(gateway))
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(grpc.insecure_channel(scheduler))
        self.prompt_ids, self.output_tokens = prompt_ids, output_tokens
        self.sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)

    def prompt(self, n: int) -> list[int]:
        """A prompt of its own for each request, so no prefix is ever served from the KV cache pool."""
        return [n + 1000] + self.prompt_ids[1:]

    def via_gateway(self, n: int):
        request = gateway_pb2.GenerateRequest(prompt_token_ids=self.prompt(n), sampling=self.sampling)
        return timed(self.gateway.Generate(request, timeout=300))

    def via_decode(self, n: int):
        prompt = self.prompt(500 + n)
        route = self.scheduler.Route(scheduler_pb2.RouteRequest(request_id=f"bench-{n}",
                                                                prompt_token_ids=prompt), timeout=10)
        request = decode_pb2.DecodeRequest(request_id=f"bench-direct-{n}", prompt_token_ids=prompt,
                                           sampling=self.sampling,
                                           prefill=decode_pb2.PeerRef(address=route.prefill.address))
        stub = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(route.decode.address))
        return timed(stub.Generate(request, timeout=300))


def measure(bench: Bench, rounds: int) -> dict:
    gateway_itl, decode_itl, ttft_rows = [], [], []
    bench.via_gateway(rounds)  # warm-up: first-call costs of every process
    for n in range(rounds):
        times, last = bench.via_gateway(n)
        gateway_itl += gaps(times)
        t = last.timings
        ttft_rows.append({"ttft_s": times[0], "prefill_compute_s": t.prefill_compute_seconds,
                          "kv_transfer_s": t.kv_transfer_seconds, "kv_bytes": t.kv_transfer_bytes,
                          "transport": t.kv_transport})
        times, _ = bench.via_decode(n)
        decode_itl += gaps(times)
        print(f"round {n + 1}/{rounds}: TTFT {ttft_rows[-1]['ttft_s'] * 1e3:.1f} ms "
              f"(prefill compute {t.prefill_compute_seconds * 1e3:.1f} ms)", flush=True)
    ttft = statistics.median(r["ttft_s"] for r in ttft_rows)
    compute = statistics.median(r["prefill_compute_s"] for r in ttft_rows)
    return {
        "gateway_itl_p50_ms": percentile(gateway_itl, 50) * 1e3, "gateway_itl_p99_ms": percentile(gateway_itl, 99) * 1e3,
        "decode_itl_p50_ms": percentile(decode_itl, 50) * 1e3, "decode_itl_p99_ms": percentile(decode_itl, 99) * 1e3,
        "itl_ratio_p50": percentile(gateway_itl, 50) / percentile(decode_itl, 50),
        "ttft_ms": ttft * 1e3, "prefill_compute_ms": compute * 1e3,
        "ttft_overhead_ratio": (ttft - compute) / compute, "requests": ttft_rows,
    }


def results_table(row: dict, command: str) -> str:
    r = row
    return "\n".join([
        f"\n## Mesh overhead ({time.strftime('%Y-%m-%d')})\n", f"`{command}`\n",
        f"Model `{r['model']}`, prompt {r['prompt_tokens']} tokens, {r['output_tokens']} output tokens, transport "
        f"{r['requests'][0]['transport']}, {r['rounds']} rounds.\n",
        "| measure | value | goal |", "| --- | --- | --- |",
        f"| ITL p50 through the gateway / on the decode worker's stream | {r['gateway_itl_p50_ms']:.2f} ms / "
        f"{r['decode_itl_p50_ms']:.2f} ms = **{r['itl_ratio_p50']:.3f}** | <= 1.05 |",
        f"| ITL p99 through the gateway / on the decode worker's stream | {r['gateway_itl_p99_ms']:.2f} ms / "
        f"{r['decode_itl_p99_ms']:.2f} ms | |",
        f"| TTFT idle; prefill compute | {r['ttft_ms']:.1f} ms; {r['prefill_compute_ms']:.1f} ms | |",
        f"| (TTFT - prefill compute) / prefill compute | **{r['ttft_overhead_ratio']:.3f}** | <= 0.10 |", ""])


def default_model() -> str:
    from kvmesh.services.engine.model_init import init_model
    from kvmesh.services.models import home

    path = home() / "models" / "kvmesh-small-llama"
    if not (path / "model.safetensors").exists():
        print(f"making the small preset in {path}", flush=True)
        init_model(path, preset="small")
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the `small` preset, made once)")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 256-token prompt")
    parser.add_argument("--out", help="write the JSON row here")
    parser.add_argument("--results", help="append a table to this markdown file (e.g. bench/RESULTS.md)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.prompt_tokens = 3, 256
    model = args.model or default_model()
    up = argparse.Namespace(model=model, prefill=1, decode=1, grpc_port=launcher.free_port(),
                            http_port=launcher.free_port(), transport=args.transport, transport_chaos="",
                            lease_s=5.0, threads_per_worker=1)
    mesh = launcher.Mesh(launcher.plan(up))
    mesh.start()
    try:
        time.sleep(1.0)  # registrations are asynchronous to SERVING
        prompt = [(7 * i + 11) % 900 + 3 for i in range(args.prompt_tokens)]
        bench = Bench(mesh.children[-1].address, mesh.children[0].address, prompt, args.output_tokens)
        row = measure(bench, args.rounds)
    finally:
        mesh.stop()
    row.update(model=Path(model).name, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
               rounds=args.rounds)
    print(json.dumps({k: v for k, v in row.items() if k != "requests"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    if args.results:
        with open(args.results, "a") as f:
            f.write(results_table(row, "python " + " ".join(sys.argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
