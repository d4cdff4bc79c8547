"""Engine micro-benchmark: kvmesh's LLMEngine against HF transformers `generate` on the same model, same run.

    python bench/engine.py [--quick] [--out FILE.json] [--model PATH] [--family llama,mixtral [--preset small]]
                           [--dtype float32|bfloat16]
                           [--threads N] [--cores 0,1] [--clock wall|cpu] [--batches 1,32] [--prefills 128,512]
                           [--reps N] [--results bench/RESULTS.md] [--plot FILE.png] [--label TEXT] [--device cuda]

Models: SmolLM2-135M (--model, default /tmp/smollm2) and the `small` preset (made with `kvmesh model init` in a
temporary folder); --model given alone benchmarks only that model; --family benchmarks the `small` preset of
each family named (e.g. llama,mixtral: Mixtral's small preset has 4 experts, top 2, each half llama's MLP, so
both run the same active parameters per token). Both dtypes unless --dtype.

Decode: `batch` greedy requests, prompts of 32-256 random tokens (fixed seed), 64 output tokens, EOS ignored.
Decode tok/s counts decode steps only, on both sides the same way: the time from the moment the first output
token of the batch exists (end of prefill) to the moment the last one does, divided into batch x 63 tokens.
kvmesh: the engine's token budget is set so the whole batch prefills in its first step(); every later step()
is a pure decode step, and the clock runs from the end of step 1 to the end of the last step (sampling,
stop checks and output building included). HF: `generate` with a LogitsProcessor that stamps the clock each
time it is called (once per generated token, after that token's forward); decode time = last stamp - first
stamp (the batch is left-padded, as HF needs).

Prefill: one prompt of 128, 512 or 2,048 tokens, max_tokens=1; kvmesh times the step() that prefills it, HF
one forward of the prompt with a fresh cache (what generate's prefill does). Rows say "phase": "prefill".

The process is pinned (os.sched_setaffinity, default: the last core) and torch runs --threads threads
(default 1): the machine has 2 cores shared with other work. Numbers are noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SMOLLM2 = "/tmp/smollm2"
PROMPT_RANGE = (32, 256)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
now = time.perf_counter  # set by --clock (and --device: a GPU's clock waits for the GPU)
DEVICE = "cpu"  # set by --device: both engines run there


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + batch)
    lens = torch.randint(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


# ---- kvmesh -------------------------------------------------------------------------------------------------

def kvmesh_engine(path: str, dtype: str, max_batch: int, max_len: int):
    from kvmesh.services.engine.engine import LLMEngine

    num_blocks = max_batch * (-(-max_len // 16) + 1) + 8  # room for every sequence: no preemption
    return LLMEngine.from_path(path, dtype=dtype, device=DEVICE, block_size=16, num_blocks=num_blocks,
                               max_num_seqs=max_batch,
                               max_num_batched_tokens=max(max_batch * PROMPT_RANGE[1], max_len) + 64)


def kvmesh_decode(engine, batch: int, out_tokens: int) -> float:
    from kvmesh.services.engine.sampler import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=out_tokens, ignore_eos=True)
    for i, p in enumerate(prompts(batch, engine.vocab_size)):
        engine.add_request(f"r{i}", p, params)
    engine.step()  # the whole batch prefills here and samples its first tokens
    first = now()
    steps, produced = 0, 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    elapsed = now() - first
    if produced != batch * (out_tokens - 1):
        raise RuntimeError(f"kvmesh produced {produced} decode tokens, expected {batch * (out_tokens - 1)}")
    return produced / elapsed


def kvmesh_prefill(engine, n: int) -> float:
    from kvmesh.services.engine.sampler import SamplingParams

    ids = torch.randint(3, engine.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    engine.add_request(f"p{n}", ids, SamplingParams(temperature=0, max_tokens=1))
    t = now()
    engine.step()
    elapsed = now() - t
    while engine.has_unfinished():
        engine.step()
    return n / elapsed


# ---- HF transformers ----------------------------------------------------------------------------------------

class StepClock:
    """A LogitsProcessor that only records when it is called (once per generated token)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(now())
        return scores


def hf_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(DEVICE)
    model.eval()
    model.generation_config.eos_token_id = None  # ignore EOS: always 64 tokens
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def hf_decode(model, batch: int, out_tokens: int) -> float:
    from transformers import LogitsProcessorList

    ps = prompts(batch, model.config.vocab_size)
    width = max(map(len, ps))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
    clock = StepClock()
    out = model.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=out_tokens,
                         do_sample=False, logits_processor=LogitsProcessorList([clock]))
    if out.shape[1] - width != out_tokens or len(clock.stamps) != out_tokens:
        raise RuntimeError(f"HF generated {out.shape[1] - width} tokens, expected {out_tokens}")
    return batch * (out_tokens - 1) / (clock.stamps[-1] - clock.stamps[0])


@torch.inference_mode()
def hf_prefill(model, n: int) -> float:
    from transformers import DynamicCache

    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    t = now()
    model(input_ids=ids.to(DEVICE), past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return n / (now() - t)


# ---- driver -------------------------------------------------------------------------------------------------

def best(fn, reps: int) -> float:
    return max(fn() for _ in range(reps))


def bench_model(name: str, path: str, dtype: str, batches, prefills, out_tokens: int, reps: int) -> list[dict]:
    from kvmesh.services.engine.weights import load_config

    ctx = load_config(path).max_position_embeddings
    prefills = [n for n in prefills if n < ctx]
    engine = kvmesh_engine(path, dtype, max(batches), max(PROMPT_RANGE[1] + out_tokens, max(prefills, default=0) + 1))
    hf = hf_model(path, dtype)
    kvmesh_decode(engine, min(2, max(batches)), 4), hf_decode(hf, 2, 4)  # warm up both
    rows = []
    for b in batches:
        k = best(lambda: kvmesh_decode(engine, b, out_tokens), reps)
        h = best(lambda: hf_decode(hf, b, out_tokens), reps)
        rows.append({"phase": "decode", "batch": b, "dtype": dtype, "model": name, "kvmesh_tok_s": round(k, 1),
                     "hf_tok_s": round(h, 1), "ratio": round(k / h, 2)})
        print(json.dumps(rows[-1]), flush=True)
    for n in prefills:
        k = best(lambda: kvmesh_prefill(engine, n), reps)
        h = best(lambda: hf_prefill(hf, n), reps)
        rows.append({"phase": "prefill", "prompt_tokens": n, "batch": 1, "dtype": dtype, "model": name,
                     "kvmesh_tok_s": round(k, 1), "hf_tok_s": round(h, 1), "ratio": round(k / h, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def small_model(family: str = "llama", preset: str = "small") -> str:
    from kvmesh.services.engine.model_init import init_model

    path = Path(tempfile.gettempdir()) / f"kvmesh-bench-{family}-{preset}"
    if not (path / "config.json").exists():
        init_model(path, preset=preset, family=family)
    return str(path)


def cpu() -> str:
    """`lscpu`'s model name, CPU count and flags: figures from another CPU are not comparable."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out)}
    return f"{info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs; flags: `{info.get('Flags', '?')}`"


def table(rows: list[dict]) -> str:
    lines = ["| model | dtype | phase | batch / prompt | kvmesh tok/s | HF tok/s | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        size = r["batch"] if r["phase"] == "decode" else r["prompt_tokens"]
        lines.append(f"| {r['model']} | {r['dtype']} | {r['phase']} | {size} | {r['kvmesh_tok_s']} | "
                     f"{r['hf_tok_s']} | {r['ratio']} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({(r["model"], r["dtype"]) for r in rows if r["phase"] == "decode"})
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 4), squeeze=False)
    for ax, (model, dtype) in zip(axes[0], series):
        rs = [r for r in rows if r["phase"] == "decode" and r["model"] == model and r["dtype"] == dtype]
        xs = [str(r["batch"]) for r in rs]
        pos = range(len(xs))
        ax.bar([p - 0.2 for p in pos], [r["kvmesh_tok_s"] for r in rs], 0.4, label="kvmesh")
        ax.bar([p + 0.2 for p in pos], [r["hf_tok_s"] for r in rs], 0.4, label="HF generate")
        for p, r in zip(pos, rs):
            ax.text(p - 0.2, r["kvmesh_tok_s"], f"{r['ratio']}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(pos), xs)
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"{model} {dtype}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def write_results(args, argv, cores: list[int], rows: list[dict]) -> None:
    """Append a markdown section with the command, the machine and the table to args.results."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python " + shlex.join(["bench/engine.py"] + (argv if argv is not None else sys.argv[1:]))
    text = (f"\n## Engine{(' — ' + args.label) if args.label else ''} ({stamp})\n\n`{cmd}`\n\n"
            f"Pinned to cores {cores}, torch threads {args.threads}, {args.clock} clock, "
            f"torch {torch.__version__}, device {DEVICE}"
            f"{(' (' + torch.cuda.get_device_name(DEVICE) + ')') if DEVICE.startswith('cuda') else ''}. "
            f"CPU: {cpu()}\n\n"
            f"{table(rows)}\n")
    if args.plot:
        text += f"\n![engine]({args.plot.name})\n"
    with open(args.results, "a") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batches 1 and 32, prefill 128 and 512, one model")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--model", help=f"benchmark only this HF folder (default: {SMOLLM2} and the small preset)")
    ap.add_argument("--family", help="comma-separated `kvmesh model init` families: benchmark their --preset "
                    "(made once in a temporary folder) instead of the default models")
    ap.add_argument("--preset", default="small", help="the preset of --family models (default small)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: both")
    ap.add_argument("--batches", help="comma-separated decode batch sizes (overrides the default set)")
    ap.add_argument("--prefills", help="comma-separated prefill prompt lengths; empty = none")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--cores", help="comma-separated cores to pin to (default: the last core)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (steadier when other work shares the cores)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions per point; the best is kept")
    ap.add_argument("--results", type=Path, help="append a markdown section to this file (bench/RESULTS.md)")
    ap.add_argument("--plot", type=Path, help="save a PNG of the decode rows here")
    ap.add_argument("--label", default="", help="a note for the RESULTS.md heading")
    ap.add_argument("--device", default="cpu", help="torch device of both engines: cpu (default), cuda, cuda:1")
    args = ap.parse_args(argv)

    global now, DEVICE
    DEVICE, clock = args.device, CLOCKS[args.clock]
    now = (lambda: (torch.cuda.synchronize(DEVICE), clock())[1]) if DEVICE.startswith("cuda") else clock
    cores = [int(c) for c in args.cores.split(",")] if args.cores else [max(os.sched_getaffinity(0))]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(args.threads)
    batches = (1, 32) if args.quick else (1, 8, 32, 64)
    prefills = (128, 512) if args.quick else (128, 512, 2048)
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    if args.prefills is not None:
        prefills = tuple(int(n) for n in args.prefills.split(",") if n)
    models = [("SmolLM2-135M", args.model or SMOLLM2)]
    if not args.model and not args.quick:
        models.append(("small", small_model()))
    if args.family:
        models = [(f"{f}-{args.preset}", small_model(f, args.preset)) for f in args.family.split(",")]
    dtypes = [args.dtype] if args.dtype else ["float32", "bfloat16"]
    print(f"pinned to cores {cores}, torch threads {torch.get_num_threads()}", file=sys.stderr)
    rows = []
    for name, path in models:
        for dtype in dtypes:
            rows += bench_model(name, path, dtype, batches, prefills, 64, args.reps)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    if args.results:
        write_results(args, argv, cores, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
