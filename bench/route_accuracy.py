"""How close slo_aware's predictions come to what a real mesh measures, after warm-up on a steady workload.

    python bench/route_accuracy.py [--model ~/.cache/kvmesh/models/SmolLM2-135M-Instruct] [--requests 80]
        [--warmup 20] [--concurrency 2] [--input-len 200] [--output-len 32]

Starts scheduler, cache, one prefill and one decode worker and the gateway (the e2e tests' helper), then runs
`--concurrency` clients that each, per request, ask the scheduler where a prompt would go (a dry-run Route)
and generate it through the gateway's gRPC API, timing the first token and the tokens after it. The prediction
compared is the real route's (the scheduler's Route span carries it; spans go to a JSON-lines file): a dry run
does not see the requests other clients send at the same moment, the real route does. Prints, after the warm-up
requests, the median of predicted / measured for TTFT and TPOT (the dry run's too), and the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from mesh import start_mesh  # noqa: E402
from kvmesh.services.common import conventions as names  # noqa: E402
from kvmesh.services.scheduler.explain import ATTR_PREDICTED_TPOT, ATTR_PREDICTED_TTFT  # noqa: E402
from kvmesh.services.trace.spans import read_jsonl  # noqa: E402
from kvmesh.v1 import common_pb2, gateway_pb2, scheduler_pb2, scheduler_pb2_grpc  # noqa: E402


def one(mesh, prompt: list[int], max_tokens: int) -> dict:
    scheduler = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
    plan = scheduler.Route(scheduler_pb2.RouteRequest(prompt_token_ids=prompt, dry_run=True), timeout=10)
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start, stamps, rid = time.perf_counter(), [], uuid.uuid4().hex
    for response in mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(
            prompt_token_ids=prompt, sampling=params, request_id=rid), timeout=120):
        stamps += [time.perf_counter()] * len(response.token_ids)
    ttft = stamps[0] - start
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return {"request_id": rid, "dry_ttft_s": plan.predicted_ttft_seconds, "dry_tpot_s": plan.predicted_tpot_seconds,
            "ttft_s": ttft, "tpot_s": tpot, "kv_source": plan.kv_source}


def real_predictions(path: Path) -> dict[str, tuple[float, float]]:
    """request id -> (predicted TTFT, TPOT) of its real route, from the scheduler's Route spans."""
    spans = read_jsonl(path)
    rid_of = {s.trace_id: s.attributes.get(names.ATTR_REQUEST_ID) for s in spans if s.name == names.REQUEST_SPAN}
    return {rid_of[s.trace_id]: (s.attributes[ATTR_PREDICTED_TTFT], s.attributes[ATTR_PREDICTED_TPOT])
            for s in spans if s.trace_id in rid_of and ATTR_PREDICTED_TTFT in s.attributes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/kvmesh/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    spans = Path(tempfile.mkdtemp(prefix="route-accuracy-")) / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(spans), "OTEL_BSP_SCHEDULE_DELAY": "200"}
    mesh = start_mesh(args.model, worker_args=("--torch-threads", "1"), env=env)
    rows, lock = [], threading.Lock()
    try:
        def client(c: int) -> None:
            for i in range(c, args.requests, args.concurrency):
                prompt = [(i * 7919 + j * 31) % 30000 + 100 for j in range(args.input_len)]  # no reuse
                row = one(mesh, prompt, args.output_len)
                with lock:
                    rows.append({"index": i, **row})

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        mesh.close()
    real = real_predictions(spans)
    for r in rows:
        r["predicted_ttft_s"], r["predicted_tpot_s"] = real.get(r["request_id"], (float("nan"), float("nan")))
    steady = [r for r in rows if r["index"] >= args.warmup and r["request_id"] in real]
    print(f"{len(steady)} requests after {args.warmup} of warm-up, concurrency {args.concurrency}, "
          f"{args.input_len} prompt / {args.output_len} output tokens")
    for label, key in (("real route", "predicted"), ("dry run", "dry")):
        ttft = statistics.median(r[f"{key}_ttft_s"] / r["ttft_s"] for r in steady)
        tpot = statistics.median(r[f"{key}_tpot_s"] / r["tpot_s"] for r in steady if r["tpot_s"] > 0)
        print(f"median predicted/measured, {label}: TTFT {ttft:.2f}, TPOT {tpot:.2f}")
    print(f"measured p50: TTFT {1e3 * statistics.median(r['ttft_s'] for r in steady):.0f} ms, TPOT "
          f"{1e3 * statistics.median(r['tpot_s'] for r in steady):.1f} ms; predicted p50: TTFT "
          f"{1e3 * statistics.median(r['predicted_ttft_s'] for r in steady):.0f} ms, TPOT "
          f"{1e3 * statistics.median(r['predicted_tpot_s'] for r in steady):.1f} ms")
    flags = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "")
    print(f"flags: {flags}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
