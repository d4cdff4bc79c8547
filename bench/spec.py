"""N-gram speculative decoding: decode tok/s at batch 1 with and without it, on the same engine, in the same run.

    python bench/spec.py [--model PATH] [--dtype auto|float32|bfloat16] [--k 2,4,8] [--max-tokens 128]
                         [--reps 3] [--threads 1] [--cores N] [--out FILE.json] [--results bench/RESULTS.md]

Model: SmolLM2-135M-Instruct (real weights; `kvmesh up`'s default model) unless --model. Two prompt sets, chat
templated, greedy, the model's own EOS honoured (so with and without speculation produce the same tokens: the
run checks they do):

* repetitive: what prompt lookup is for — repeat a passage, fix one thing in a piece of code, continue a list whose
  items repeat a pattern; the output copies spans of the prompt.
* open: questions whose answers copy little of the prompt: the cost of drafting where drafts seldom hold.

Each request runs alone (batch 1), without speculation and with each K in turn, --reps times round; the median
wall time of each counts. Decode tok/s = (output tokens - 1) / (time of every step after the first, which prefills the prompt and
samples the first token); end-to-end tok/s = output tokens / the whole generate call. Acceptance rate = accepted
draft tokens / draft tokens. The process is pinned to one core (default the last) with --threads torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from machine import machine  # bench/machine.py (this script's folder is on sys.path)

PASSAGE = ("The paged KV cache stores the keys and values of every token in fixed-size blocks. A block table maps "
           "each sequence's positions to blocks, so sequences grow without copying, share the blocks of a common "
           "prefix, and give their blocks back the moment they finish.")
CODE = '''def load_config(path):
    with open(path) as f:
        raw = json.load(f)
    hidden = raw["hidden_size"]
    heads = raw["num_attention_heads"]
    layers = raw["num_hidden_layers"]
    return Config(hidden=hidden, heads=heads, layers=layers)
'''
PROMPTS = {
    "repetitive": [
        f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
        f"Rename the function load_config to read_config in this code and print the whole code:\n\n{CODE}",
        "Continue this list with five more lines in the same pattern:\nServer 1: status OK, load 10%\n"
        "Server 2: status OK, load 20%\nServer 3: status OK, load 30%\nServer 4: status OK, load 40%",
        f"Here is a paragraph:\n\n{PASSAGE}\n\nWrite it again, then say in one sentence what a block table does.",
    ],
    "open": ["What is the capital of France? Answer in two sentences.",
             "Give three tips for writing clear technical documentation.",
             "Explain what a hash function is to a ten year old."],
}



def generate(engine, ids: list[int], max_tokens: int) -> tuple[list[int], float, float]:
    """(tokens, seconds of the whole call, seconds after the first step) of one greedy request alone."""
    from kvmesh.services.engine.sampler import SamplingParams

    engine.add_request("r", ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    tokens, start, first = [], time.perf_counter(), None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
        first = first or time.perf_counter()
    end = time.perf_counter()
    return tokens, end - start, end - first


def measure(engine, speculators: dict, ids: list[int], max_tokens: int, reps: int) -> dict:
    """Per configuration (name -> speculator or None): tokens, median seconds and tok/s, the configurations
    interleaved in every repetition so that the machine's load drifts over all alike."""
    runs: dict = {name: [] for name in speculators}
    for _ in range(reps):
        for name, speculator in speculators.items():
            engine.speculator = speculator
            runs[name].append(generate(engine, ids, max_tokens))
    out = {}
    for name, got in runs.items():
        tokens = got[0][0]
        assert all(r[0] == tokens for r in got), "greedy output changed between repetitions"
        total, decode = statistics.median(r[1] for r in got), statistics.median(r[2] for r in got)
        out[name] = {"tokens": tokens, "total_s": total, "decode_s": decode, "tok_s": len(tokens) / total,
                     "decode_tok_s": (len(tokens) - 1) / decode if decode > 0 else 0.0}
    return out


def run(args) -> dict:
    from transformers import AutoTokenizer

    from kvmesh.services.engine.engine import LLMEngine
    from kvmesh.services.engine.speculative import NgramSpeculator, SpeculativeConfig

    engine = LLMEngine.from_path(args.model, dtype=args.dtype, num_blocks=256, max_num_seqs=1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = []
    for kind, prompts in PROMPTS.items():
        for i, prompt in enumerate(prompts):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer.encode(text, add_special_tokens=False)
            generate(engine, ids, 4)  # warm
            speculators = {0: None} | {k: NgramSpeculator(SpeculativeConfig(num_speculative_tokens=k),
                                                          engine.max_model_len) for k in args.k}
            got = measure(engine, speculators, ids, args.max_tokens, args.reps)
            base = got[0]
            for k in args.k:
                stats = speculators[k].stats()
                rows.append({"set": kind, "prompt": i, "k": k, "prompt_tokens": len(ids),
                             "output_tokens": len(base["tokens"]), "identical": got[k]["tokens"] == base["tokens"],
                             "base_decode_tok_s": base["decode_tok_s"], "spec_decode_tok_s": got[k]["decode_tok_s"],
                             "base_tok_s": base["tok_s"], "spec_tok_s": got[k]["tok_s"],
                             "acceptance": stats["accepted_tokens"] / max(stats["draft_tokens"], 1)})
                print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "machine": machine(), "dtype": str(engine.model.dtype), "threads": torch.get_num_threads()}


def summary(rows: list[dict]) -> list[dict]:
    """Per (set, k): summed tokens over summed time, both ways (a rate over the whole set), and acceptance."""
    out = []
    for kind in PROMPTS:
        for k in sorted({r["k"] for r in rows}):
            sel = [r for r in rows if r["set"] == kind and r["k"] == k]
            toks = sum(r["output_tokens"] - 1 for r in sel)
            base = toks / sum((r["output_tokens"] - 1) / r["base_decode_tok_s"] for r in sel)
            spec = toks / sum((r["output_tokens"] - 1) / r["spec_decode_tok_s"] for r in sel)
            out.append({"set": kind, "k": k, "base": base, "spec": spec, "ratio": spec / base,
                        "e2e_ratio": statistics.median(r["spec_tok_s"] / r["base_tok_s"] for r in sel),
                        "acceptance": statistics.mean(r["acceptance"] for r in sel),
                        "identical": all(r["identical"] for r in sel)})
    return out


def markdown(result: dict, command: str) -> str:
    m = result["machine"]
    lines = [f"## N-gram speculative decoding at batch 1 (issue #18), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", f"`{command}`", "",
             f"{m.get('Model name', '?')}, {result['threads']} torch thread(s) pinned to one core, {result['dtype']}, "
             f"1-minute load average {m['loadavg']:.1f}. Decode tok/s over the whole set (output tokens after the "
             "first / time of the steps after the first); e2e = the median per-prompt ratio of whole generate calls; "
             "identical = the same greedy tokens with and without speculation.", "",
             "| prompts | K | decode tok/s without | with | ratio | e2e ratio | acceptance | identical |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary(result["rows"]):
        lines.append(f"| {s['set']} | {s['k']} | {s['base']:.1f} | {s['spec']:.1f} | {s['ratio']:.2f}x | "
                     f"{s['e2e_ratio']:.2f}x | {s['acceptance']:.0%} | {'yes' if s['identical'] else 'NO'} |")
    flags = " ".join(f for f in m.get("Flags", "").split() if "avx" in f or "amx" in f or "bf16" in f)
    lines += ["", f"lscpu flags (vector ones): `{flags}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: SmolLM2-135M-Instruct, as `kvmesh up` makes it)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", default="2,4,8", help="comma-separated numbers of speculative tokens")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cores", default="", help="cores to pin to (default: the last one)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--results", type=Path, help="append a markdown section to this file (bench/RESULTS.md)")
    args = ap.parse_args()
    args.k = [int(k) for k in args.k.split(",")]
    if not args.model:
        from kvmesh.services.models import default_model
        args.model = str(default_model())
    cores = [int(c) for c in args.cores.split(",")] if args.cores else [max(os.sched_getaffinity(0))]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(args.threads)
    result = run(args)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    text = markdown(result, command)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
