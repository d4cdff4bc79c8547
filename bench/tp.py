"""Tensor parallelism on this machine: tokens/s of the engine at TP 1 against TP 2, same model, same run.

    python bench/tp.py [--preset small] [--family llama] [--batches 1,8] [--prompt-len 256] [--new-tokens 32]
                       [--reps 2] [--out FILE.json]

Configurations: TP 1 with 1 torch thread, TP 1 with 2 threads (both cores to one process), TP 2 with 1 thread
per rank (each rank a process; gloo all-reduces over 127.0.0.1). Each rep runs every configuration in turn, so
drift of the machine's load hits all of them alike; the figure kept is the best rep.

Decode: `batch` greedy requests of prompt-len random tokens, new-tokens outputs (EOS ignored); decode tok/s =
batch x (new-tokens - 1) / (time from the end of the prefill step to the end of the last step). Prefill: the
step that prefills one prompt of prompt-len tokens, in tokens/s. Each figure also per CPU-second (`*_per_cpu_s`:
tokens / CPU time of every rank, utime+stime from /proc): on a loaded shared machine two processes get more of
the CPU than one, which flatters TP 2's wall-clock rate; the CPU figure shows what the split costs. Ratios are against TP 1 / 1 thread of the
same rep. The machine is shared: compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

CONFIGS = [("tp1-1thread", 1, 1), ("tp1-2threads", 1, 2), ("tp2-1thread-per-rank", 2, 1)]


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def cpu_seconds(engine) -> float:
    """CPU time so far of this process and of the engine's follower ranks (every rank's work)."""
    total = time.process_time()
    group = getattr(engine.model, "group", None)
    for p in group.followers if group else []:
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def decode_rate(engine, batch: int, length: int, new_tokens: int) -> tuple[float, float]:
    from kvmesh.services.engine.sampler import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts(batch, length, engine.vocab_size)):
        engine.add_request(f"d{batch}-{i}", ids, params)
    engine.step()  # the whole batch prefills here (the token budget covers it)
    start, cpu = time.perf_counter(), cpu_seconds(engine)
    while engine.has_unfinished():
        engine.step()
    tokens = batch * (new_tokens - 1)
    return tokens / (time.perf_counter() - start), tokens / (cpu_seconds(engine) - cpu)


def prefill_rate(engine, length: int) -> float:
    from kvmesh.services.engine.sampler import SamplingParams

    engine.add_request("p", prompts(1, length, engine.vocab_size)[0], SamplingParams(temperature=0, max_tokens=1))
    start, cpu = time.perf_counter(), cpu_seconds(engine)
    while engine.has_unfinished():
        engine.step()
    return length / (time.perf_counter() - start), length / (cpu_seconds(engine) - cpu)


def run_config(path: str, size: int, threads: int, args) -> dict:
    from kvmesh.services.engine.engine import LLMEngine

    torch.set_num_threads(threads)
    os.environ["KVMESH_TORCH_THREADS"] = str(threads)  # the follower ranks' threads
    max_batch = max(args.batches)
    engine = LLMEngine.from_path(path, dtype="float32", max_num_seqs=max_batch,
                                 max_num_batched_tokens=max_batch * args.prompt_len,
                                 num_blocks=max_batch * (-(-(args.prompt_len + args.new_tokens) // 16)) + 4,
                                 tensor_parallel_size=size)
    try:
        out = dict(zip(("prefill_tok_s", "prefill_tok_per_cpu_s"), prefill_rate(engine, args.prompt_len)))
        for b in args.batches:
            rates = decode_rate(engine, b, args.prompt_len, args.new_tokens)
            out.update(zip((f"decode_b{b}_tok_s", f"decode_b{b}_tok_per_cpu_s"), rates))
        return out
    finally:
        engine.model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from kvmesh.services.engine.model_init import init_model

    with tempfile.TemporaryDirectory() as tmp:
        path = str(init_model(Path(tmp) / "model", args.preset, args.family))
        reps = []
        for rep in range(args.reps):
            row = {name: run_config(path, size, threads, args) for name, size, threads in CONFIGS}
            reps.append(row)
            print(json.dumps({"rep": rep, **row}), flush=True)
    best = {name: {k: max(r[name][k] for r in reps) for k in reps[0][name]} for name, _, _ in CONFIGS}
    base = best[CONFIGS[0][0]]
    ratios = {name: {k: round(v / base[k], 3) for k, v in figs.items()} for name, figs in best.items()}
    result = {"model": f"{args.family}-{args.preset}", "args": vars(args), "best": best,
              "ratio_vs_tp1_1thread": ratios, "reps": reps, "machine": machine()}
    print(json.dumps({"best": best, "ratio_vs_tp1_1thread": ratios}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
