"""Gemma decode: what reading only the window's blocks on sliding-window layers saves, same weights, same run.

    python bench/gemma_window.py [--family gemma2|gemma3] [--batch 8] [--context 1024] [--window 128]
                                 [--steps 16] [--reps 3] [--threads 1] [--dtype float32]

One `small`-preset model (made with `kvmesh model init`), two configs over the same weights: `windowed` keeps
sliding_window = --window (its local layers' decode reads at most window_blocks blocks per sequence), `full`
sets it past the context (every layer reads the whole context, as a model without local layers would). Each
prefills --batch sequences of --context tokens, then times --steps batched decode steps of the model's forward
(`GemmaModel.forward`, one token per sequence); reps interleave the two, best of --reps. The ratio full / windowed is the number to read.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kvmesh.services.engine.batch import Chunk, build_batch
from kvmesh.services.engine.gemma import GemmaModel
from kvmesh.services.engine.kv_cache import KVCache
from kvmesh.services.engine.model_init import init_model
from kvmesh.services.kv_identity import KVLayout

BLOCK = 16


def prefilled(path: Path, batch: int, context: int, steps: int, dtype: str):
    """(model, KV pool, block tables) with `batch` sequences of `context` random tokens prefilled."""
    model = GemmaModel.from_path(path, dtype, max_positions=context + steps + 1)
    c = model.config
    per_seq = -(-(context + steps) // BLOCK)
    kv = KVCache(KVLayout("b", dtype, BLOCK, c.num_layers, c.num_kv_heads, c.head_dim), batch * per_seq)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    g = torch.Generator().manual_seed(0)
    for table in tables:
        ids = torch.randint(3, c.vocab_size, (context,), generator=g).tolist()
        model.forward(build_batch([Chunk(ids, 0, table, want_logits=False)], BLOCK), kv)
    return model, kv, tables


def decode_ms(model: GemmaModel, kv: KVCache, tables: list[list[int]], context: int, steps: int) -> float:
    """Milliseconds per batched decode step over `steps` steps (each rewrites the same positions' K/V)."""
    start = time.perf_counter()
    for step in range(steps):
        chunks = [Chunk([5 + step], context + step, t) for t in tables]
        model.forward(build_batch(chunks, BLOCK, group_cost=model.decode_group_cost), kv)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="gemma2", choices=["gemma2", "gemma3"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = init_model(Path(tmp) / "m", "small", args.family)
        config = json.loads((path / "config.json").read_text())
        setups = {}
        for name, window in (("full", args.context + args.steps + 1), ("windowed", args.window)):
            (path / "config.json").write_text(json.dumps({**config, "sliding_window": window}))
            setups[name] = prefilled(path, args.batch, args.context, args.steps, args.dtype)
    rows = {name: float("inf") for name in setups}
    for _ in range(args.reps):  # interleaved, so load on the shared cores hits both alike; best of reps
        for name, (model, kv, tables) in setups.items():
            rows[name] = min(rows[name], decode_ms(model, kv, tables, args.context, args.steps))
    print(json.dumps({"family": args.family, "batch": args.batch, "context": args.context, "window": args.window,
                      "threads": args.threads, "dtype": args.dtype,
                      "full_ms_per_step": round(rows["full"], 2), "windowed_ms_per_step": round(rows["windowed"], 2),
                      "full_over_windowed": round(rows["full"] / rows["windowed"], 2)}))


if __name__ == "__main__":
    main()
