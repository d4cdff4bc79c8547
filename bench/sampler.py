"""What the penalties and logit bias cost the sampler, per decode step, against plain sampling in the same run.

    python bench/sampler.py [--batch 32] [--vocab 49152] [--history 512] [--rounds 30] [--out bench/sampler.json]
                            [--results bench/RESULTS.md]

One call of `sample()` over a batch of `--batch` rows of `--vocab` logits (SmolLM2's vocabulary by default), each
row with `--history` tokens so far (half prompt, half output), for each configuration; configurations are
interleaved round by round so load on the shared cores hits each alike. Reported: the median milliseconds per
step and its ratio to plain temperature sampling measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from machine import machine  # bench/machine.py (this script's folder is on sys.path)

from kvmesh.services.engine.sampler import SamplingParams, sample

CONFIGS = {
    "greedy": dict(temperature=0.0),
    "temperature (baseline)": dict(temperature=0.8),
    "+ repetition_penalty": dict(temperature=0.8, repetition_penalty=1.2),
    "+ presence/frequency": dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5),
    "+ logit_bias (16 tokens)": dict(temperature=0.8, logit_bias=tuple((t, -5.0) for t in range(0, 160, 10))),
    "top_p 0.9 (sorts the vocabulary)": dict(temperature=0.8, top_p=0.9),
    "top_p 0.9 + all three": dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5,
                                   frequency_penalty=0.5, logit_bias=tuple((t, -5.0) for t in range(0, 160, 10))),
}
BASELINE = "temperature (baseline)"



def measure(args) -> dict:
    g = torch.Generator().manual_seed(0)
    # a fresh logits tensor per call, as the model hands the sampler each step (none stays warm in the cache)
    pool = [torch.randn(args.batch, args.vocab, generator=g) for _ in range(8)]
    histories = [(torch.randint(0, args.vocab, (args.history,), generator=g).tolist(), args.history // 2)
                 for _ in range(args.batch)]
    generators = [torch.Generator().manual_seed(i) for i in range(args.batch)]
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for i in range(args.rounds):
        for j, (name, fields) in enumerate(CONFIGS.items()):
            params = [SamplingParams(**fields)] * args.batch
            logits = pool[(i * len(CONFIGS) + j) % len(pool)]
            start = time.perf_counter()
            sample(logits, params, generators, histories)
            times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times[BASELINE])
    return {name: {"ms": statistics.median(t), "vs_baseline": statistics.median(t) / base} for name, t in times.items()}


def results_table(rows: dict, args, cpu: dict, command: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"\n## Sampler: penalties and logit bias per decode step ({when})\n",
             f"`{command}`\n",
             f"batch {args.batch}, vocabulary {args.vocab}, {args.history} tokens of history per row, median of "
             f"{args.rounds} interleaved rounds; {cpu.get('Model name', '?')}, {cpu.get('CPU(s)', '?')} CPUs, "
             f"1-minute load average {cpu['loadavg']:.1f} at the end.\n",
             "| configuration | ms per step | vs plain temperature sampling |", "| --- | --- | --- |"]
    lines += [f"| {name} | {r['ms']:.2f} | {r['vs_baseline']:.2f} |" for name, r in rows.items()]
    lines += ["", f"<details><summary>lscpu flags</summary>\n\n`{cpu.get('Flags', '')}`\n\n</details>", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--history", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out")
    parser.add_argument("--results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as one engine thread among the mesh's processes
    rows = measure(args)
    cpu = machine()
    for name, r in rows.items():
        print(f"{name:28s} {r['ms']:8.2f} ms  x{r['vs_baseline']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": cpu, "rows": rows}, f, indent=1)
    if args.results:
        with open(args.results, "a") as f:
            f.write(results_table(rows, args, cpu, "python " + " ".join(sys.argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
