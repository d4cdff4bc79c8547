"""Reproduce a GPU cluster's KV-bandwidth-to-compute ratio on this CPU machine, and check the overlap model.

    python bench/throttle.py [--model DIR] [--prompt-tokens 1000] [--reps 4] [--out bench/throttle.json]

The model. A prefill of T tokens on a model of L layers computes for T_c seconds and produces B bytes of KV, sent
layer by layer as each layer finishes. On a GPU cluster the ratio that matters is

    r = T_x / T_c = (kv_bytes_per_token × prefill_tokens_per_s_gpu) / link_bytes_per_s

(the KV production rate over the link's rate). A CPU computes far slower, so an unthrottled transport here hides
everything; throttling the transport to

    throttle = kv_bytes_per_token × prefill_tokens_per_s_here / r

restores the same r here. With layer-wise streaming, layer l's KV exists at (l + f)·T_c/L — f is the part of a
layer's compute done before its K and V are written (the QKV projection: the engine's hook fires right after the
write, before attention and MLP; f ≈ 0.15 here) — and takes t = T_x/L to send, one layer after another. The last
byte lands at max over l of ((l + f)·T_c/L + (L − l)·t); the function is linear in l, so the transfer time the
request sees beyond its compute is

    exposed = max(0, (T_x − (1 − f)·T_c) / L, T_x − (L − f)·T_c / L)

The middle term is the last layer, hiding only behind its own attention and MLP; the last term is the link being
the critical path from layer 0 on. With f = 1 (a hook after the whole layer) this is the familiar
max(T_x / L, T_x − T_c·(L − 1)/L). The bench takes the layers' ready times from the unthrottled run's spans
(`kv.layer_sent` events relative to `prefill.compute`), i.e. the exact form of the same max. Measured: TTFT at the
client minus the prefill's compute, minus the same difference with an unthrottled transport (routing, admission,
commit and the first decode step).

Runs the real mesh (tests/e2e/mesh.py: scheduler, cache, one prefill and one decode worker, gateway) once per
throttle value, on the `small` preset (`kvmesh model init DIR --preset small`), transport shm + chaos throttle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))


@dataclass(frozen=True)
class Cluster:
    """A GPU deployment, by its KV production rate and its link: what `r` a throttle must reproduce."""

    name: str
    prefill_tokens_per_s: float  # one GPU, reference model (below)
    link_bytes_per_s: float  # usable, not nominal

    @property
    def ratio(self) -> float:
        """r = T_x / T_c on that cluster."""
        return REF_KV_BYTES_PER_TOKEN * self.prefill_tokens_per_s / self.link_bytes_per_s


# Reference model: Llama-3.1-8B in bf16: 32 layers × 8 KV heads × 128 dims × 2 (K, V) × 2 bytes = 128 KiB/token.
# Prefill ≈ 2 × 8e9 FLOP/token; at 50 % MFU an H100 SXM (989 dense bf16 TFLOP/s) does ~31k tokens/s, an A100
# (312) ~9.8k, a B200 (~2250) ~70k. Usable link rates: 400 Gb/s RDMA ~ 45 GB/s, 25 Gb/s TCP ~ 2.5 GB/s,
# 10 Gb/s TCP ~ 1.0 GB/s.
REF_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
CLUSTERS = (
    Cluster("H100 + 400 Gb/s RDMA", 31e3, 45e9),
    Cluster("A100 + 25 Gb/s TCP", 9.8e3, 2.5e9),
    Cluster("H100 + 25 Gb/s TCP", 31e3, 2.5e9),
    Cluster("H100 + 10 Gb/s TCP", 31e3, 1.0e9),
    Cluster("B200 + 25 Gb/s TCP", 70e3, 2.5e9),
)


def predicted_exposed(transfer_s: float, compute_s: float, ready: list[float]) -> float:
    """Seconds of transfer not hidden behind compute (derivation above); `ready[l]` is the fraction of the compute
    after which layer l's KV exists."""
    num_layers = len(ready)
    per_layer = transfer_s / num_layers
    finish = max(compute_s * r + (num_layers - l) * per_layer for l, r in enumerate(ready))
    return max(0.0, finish - compute_s)


def closed_form_exposed(transfer_s: float, compute_s: float, num_layers: int, f: float) -> float:
    """The same with evenly spaced layers: max(0, (T_x − (1 − f)·T_c)/L, T_x − (L − f)·T_c/L)."""
    return max(0.0, (transfer_s - (1 - f) * compute_s) / num_layers,
               transfer_s - (num_layers - f) * compute_s / num_layers)


def throttle_for(cluster: Cluster, kv_bytes_per_s_here: float) -> float:
    """Bytes/s that gives this machine the cluster's r."""
    return kv_bytes_per_s_here / cluster.ratio


def run_mesh(model: str, chaos: str, prompts: list[list[int]], traces: Path) -> list[dict]:
    """One mesh; each prompt once (after a warm-up), sequentially: TTFT at the client, compute and KV bytes from
    the prefill worker's spans."""
    from mesh import start_mesh
    from kvmesh.services.trace.spans import read_jsonl
    from kvmesh.v1 import common_pb2, gateway_pb2

    env = {"OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(traces), "OTEL_BSP_SCHEDULE_DELAY": "50"}
    # leases long enough for the slowest throttled transfer
    mesh = start_mesh(model, transport="shm", chaos=chaos, env=env, worker_args=("--handoff-lease-s", "120"))
    ttfts = []
    try:
        for prompt in prompts:
            request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(
                temperature=0.0, max_tokens=2, ignore_eos=True))
            start = time.perf_counter()
            stream = mesh.gateway_stub().Generate(request, timeout=120)
            next(stream)
            ttfts.append(time.perf_counter() - start)
            list(stream)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            spans = read_jsonl(traces) if traces.exists() else []
            computes = sorted((s for s in spans if s.name == "prefill.compute"), key=lambda s: s.start)
            sends = sorted((s for s in spans if s.name == "kv.transfer"
                            and s.attributes.get("kvmesh.kv.direction") == "send"), key=lambda s: s.start)
            if len(computes) == len(sends) == len(prompts):
                break
            time.sleep(0.1)
    finally:
        mesh.close()
    return [{"ttft_s": t, "compute_s": c.duration, "kv_bytes": s.attributes["kvmesh.kv.bytes"],
             "transfer_s": s.duration, "layer_sent": sorted((e - c.start) / c.duration for n, e in s.events
                                                            if n == "kv.layer_sent")}
            for t, c, s in zip(ttfts[1:], computes[1:], sends[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: a fresh `small` preset)")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clusters", default="A100 + 25 Gb/s TCP,H100 + 25 Gb/s TCP,B200 + 25 Gb/s TCP,"
                                                  "H100 + 10 Gb/s TCP")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            from kvmesh.services.engine.model_init import init_model
            model = str(init_model(Path(tmp) / "small", "small", "llama"))
        from transformers import AutoConfig
        num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
        rng = np.random.default_rng(0)

        def prompts() -> list[list[int]]:  # fresh tokens every request: no cache hit shortens a prefill
            return [rng.integers(10, 4000, args.prompt_tokens).tolist() for _ in range(args.reps + 1)]

        base = run_mesh(model, "", prompts(), Path(tmp) / "base.jsonl")
        compute_s = statistics.median(r["compute_s"] for r in base)
        kv_bytes = statistics.median(r["kv_bytes"] for r in base)
        overhead_s = statistics.median(r["ttft_s"] - r["compute_s"] for r in base)
        kv_rate = kv_bytes / compute_s
        ready = [statistics.median(r["layer_sent"][layer] for r in base) for layer in range(num_layers)]
        f = ready[0] * num_layers  # layer 0's KV exists after f of one layer's compute
        print(f"unthrottled: compute {compute_s * 1e3:.0f} ms, {kv_bytes / 1e6:.1f} MB KV "
              f"({kv_rate / 1e6:.1f} MB/s), TTFT - compute {overhead_s * 1e3:.0f} ms", file=sys.stderr)
        rows = []
        for cluster in (c for c in CLUSTERS if c.name in args.clusters.split(",")):
            rate = throttle_for(cluster, kv_rate)
            runs = run_mesh(model, f"throttle={rate / 1e6:.3f}MBps", prompts(), Path(tmp) / f"{len(rows)}.jsonl")
            measured = statistics.median(r["ttft_s"] - r["compute_s"] for r in runs) - overhead_s
            predicted = statistics.median(predicted_exposed(r["kv_bytes"] / rate, r["compute_s"], ready)
                                          for r in runs)
            closed = statistics.median(closed_form_exposed(r["kv_bytes"] / rate, r["compute_s"], num_layers, f)
                                       for r in runs)
            effective = statistics.median(r["kv_bytes"] / rate / r["compute_s"] for r in runs)
            row = {"cluster": cluster.name, "ratio": cluster.ratio, "throttle_MBps": rate / 1e6,
                   "effective_ratio": effective,  # T_x / T_c as run: the load here drifts between meshes
                   "compute_s": statistics.median(r["compute_s"] for r in runs),
                   "predicted_exposed_s": predicted, "closed_form_exposed_s": closed,
                   "measured_exposed_s": measured,
                   "measured_over_predicted": measured / predicted if predicted > 0 else None, "runs": runs}
            rows.append(row)
            print(f"{cluster.name}: r={cluster.ratio:.2f} throttle {rate / 1e6:.1f} MB/s  exposed: predicted "
                  f"{predicted * 1e3:.0f} ms (closed form {closed * 1e3:.0f}), measured {measured * 1e3:.0f} ms",
                  file=sys.stderr)
    result = {"model": "small preset" if not args.model else args.model, "num_layers": num_layers,
              "prompt_tokens": args.prompt_tokens, "reps": args.reps, "baseline": {
                  "compute_s": compute_s, "kv_bytes": kv_bytes, "kv_bytes_per_s": kv_rate,
                  "layer_ready_fraction": ready, "f": f,
                  "ttft_minus_compute_s": overhead_s, "runs": base}, "rows": rows}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
