"""What mTLS between the services costs: KV over the grpc backend, and one control RPC, with and without it.

    python bench/tls.py [--quick] [--out FILE.json] [--results bench/RESULTS.md]

Both in the same run, plaintext and mTLS alternating round by round (this machine is shared and noisy: compare
the ratios, not the absolute figures):
- KV transfers over the grpc backend (bench/transports.py's receiver in its own process, serving mTLS with a
  decode certificate; the sender presenting a prefill one) at 1 and 64 MiB: GB/s until the receiver holds
  verified KV;
- the round trip of one unary RPC (Scheduler.ListWorkers, through the role check) to a real `kvmesh scheduler`
  process, sequential calls on one channel: median and p99 microseconds.
Rows: {"what", "size_bytes"?, "plain", "tls", "ratio"}; ratio = tls / plain (GB/s: < 1 is slower; latency: > 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import transports as kv_bench  # noqa: E402

MiB = 1 << 20


def transfer_gbps(size: int, reps: int, tls_dir: str | None) -> float:
    """Median GB/s of `reps` grpc-backend transfers of `size`, over mTLS when tls_dir is given."""
    if tls_dir:
        os.environ["KVMESH_BENCH_TLS_DIR"] = tls_dir
    else:
        os.environ.pop("KVMESH_BENCH_TLS_DIR", None)
    return asyncio.run(kv_bench.bench_backend("grpc", [size], reps, True))[size]["gbps"]


def rpc_latency_us(calls: int, tls_dir: str | None) -> tuple[float, float]:
    """Median and p99 µs of sequential ListWorkers calls to a fresh scheduler process (admin certificate)."""
    from procs import ServiceProcess

    from kvmesh.services.common import tls
    from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

    args = ("--tls-dir", tls_dir) if tls_dir else ()
    with ServiceProcess("scheduler", *args) as scheduler:
        with tls.open_channel(scheduler.address, aio=False, identity=scheduler.identity) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            request, times = scheduler_pb2.ListWorkersRequest(), []
            for i in range(calls + 100):  # the first 100 warm up
                t = time.perf_counter()
                stub.ListWorkers(request, timeout=5)
                if i >= 100:
                    times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.99 * (len(times) - 1))] * 1e6


def run(rounds: int, reps: int, calls: int) -> list[dict]:
    from kvmesh.services.common.certs import init_dir

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        init_dir(folder, force=True)
        for size in (MiB, 64 * MiB):
            got = {"plain": [], "tls": []}
            for _ in range(rounds):  # alternate, so drift in the machine's load hits both alike
                got["plain"].append(transfer_gbps(size, reps, None))
                got["tls"].append(transfer_gbps(size, reps, folder))
            plain, secure = statistics.median(got["plain"]), statistics.median(got["tls"])
            rows.append({"what": "grpc KV transfer GB/s", "size_bytes": size, "plain": round(plain, 3),
                         "tls": round(secure, 3), "ratio": round(secure / plain, 3)})
            print(rows[-1], file=sys.stderr)
        lat = {"plain": [], "tls": []}
        for _ in range(rounds):
            lat["plain"].append(rpc_latency_us(calls, None))
            lat["tls"].append(rpc_latency_us(calls, folder))
        for i, name in enumerate(("median", "p99")):
            plain = statistics.median(x[i] for x in lat["plain"])
            secure = statistics.median(x[i] for x in lat["tls"])
            rows.append({"what": f"unary RPC {name} µs", "plain": round(plain, 1), "tls": round(secure, 1),
                         "ratio": round(secure / plain, 3)})
            print(rows[-1], file=sys.stderr)
    return rows


def write_results(rows: list[dict], command: str, path: Path) -> None:
    from serve_overhead import machine

    cpu = machine()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = ["", f"## mTLS between services: what it costs (issue #16), {stamp}", "", f"`{command}`", "",
             f"CPU: {cpu.get('Model name', '?')}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} "
             "at the end. Plaintext and mTLS alternate round by round in one run.", "",
             "| measure | plaintext | mTLS | mTLS / plaintext |", "| --- | --- | --- | --- |"]
    for row in rows:
        size = f" at {row['size_bytes'] // MiB} MiB" if "size_bytes" in row else ""
        lines.append(f"| {row['what']}{size} | {row['plain']} | {row['tls']} | **{row['ratio']}** |")
    lines += ["", f"<details><summary>lscpu flags</summary>\n\n`{cpu.get('Flags', '')}`\n\n</details>", ""]
    with path.open("a") as out:
        out.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--results", type=Path, help="append a table to this markdown file")
    args = parser.parse_args()
    rows = run(*((2, 3, 300) if args.quick else (3, 5, 1000)))
    print(json.dumps(rows, indent=1))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.results:
        write_results(rows, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), args.results)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
