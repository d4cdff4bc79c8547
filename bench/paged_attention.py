"""Decode attention over the paged KV cache: the gather path against the tiled (paged) path, and, where a C++
compiler exists, a torch.compile'd kernel that indexes the pool in place; then whole decode steps of a model.

    python bench/paged_attention.py [--batches 1,8,32] [--contexts 256,512,1024,2048] [--reps 5]
                                    [--compiled] [--model PATH] [--step-contexts 256,1024,2048] [--step-reps 3]
                                    [--prefill-contexts 2048,8192] [--threads 1]
                                    [--core 1] [--clock cpu|wall] [--out bench/paged_attention.json]

Part 1, attention alone (float32, SmolLM2-135M's shape: 9 query heads, 3 kv heads, head_dim 64, 16-token
blocks): each row's table points at random blocks of a pool larger than the batch needs; contexts vary from
half the named one up to it. Best of --reps calls (the kinds taking turns), milliseconds per layer call.
Then a prefill chunk of 4, 64 or 256 queries at the end of a context, gathered (SDPA) against tiled.
  gather    index_select every row's blocks, then scaled_dot_product_attention with a padding mask (today's path)
  paged     what the model now runs: the gather path on sub-batches of rows of at most TILE_BYTES of K each
  tiled-NM  tiled_attention (column tiles of N MiB over every row at once), always
  rows-NM   the gather path on sub-batches of rows of at most N MiB of K (the sweep TILE_BYTES was chosen from)
  compiled  (--compiled) torch.compile(inductor, C++) of an einsum-free formulation over pool[table]

Part 2, whole decode steps (--model, default SmolLM2-135M-Instruct from ~/.cache/kvmesh): batch 32, every
sequence at the named context, LlamaModel.forward timed per step with each attention mode, and the share of
the step spent in attention (model._attention timed around its calls). Noisy machine: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from kvmesh.services.engine.paged_attention import (ATTENTION_PAGED, TILE_BYTES, row_slices, tile_blocks,  # noqa: E402
                                                    tiled_attention, use_tiles)  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
now = time.process_time  # set by --clock: CPU time of this process is what a busy shared machine disturbs least
SMOLLM2 = Path.home() / ".cache/kvmesh/models/SmolLM2-135M-Instruct"


def case(n: int, ctx: int, seed: int = 0):
    """q, pools, block table [n, blocks], padding mask [n, 1, ctx] (None when every row fills ctx)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-ctx // BLOCK)
    pool = 2 * n * num_blocks + 8
    k_pool, v_pool = (torch.randn(pool, BLOCK, KV_HEADS, DIM, generator=g) for _ in range(2))
    table = torch.randperm(pool, generator=g)[:n * num_blocks].view(n, num_blocks)
    lens = torch.randint(ctx // 2, ctx + 1, (n,), generator=g)
    lens[-1] = ctx
    mask = torch.arange(num_blocks * BLOCK)[None, None, :] < lens[:, None, None]
    return torch.randn(n, HEADS, DIM, generator=g), k_pool, v_pool, table, mask


def gather(q, k_pool, v_pool, table, mask):
    n, ctx = q.shape[0], mask.shape[-1]
    k = k_pool.index_select(0, table.reshape(-1)).view(n, ctx, KV_HEADS, DIM)
    v = v_pool.index_select(0, table.reshape(-1)).view(n, ctx, KV_HEADS, DIM)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], enable_gqa=True)
    return out.reshape(n, -1)


def paged(q, k_pool, v_pool, table, mask):
    """What the model runs in paged mode: sub-batches of rows, column tiles for a row past the gather limit."""
    if use_tiles(ATTENTION_PAGED, k_pool, table.shape[1]):
        return tiled(TILE_BYTES)(q, k_pool, v_pool, table, mask)
    parts = [gather(q[r], k_pool, v_pool, table[r], mask[r])
             for r in row_slices(ATTENTION_PAGED, k_pool, q.shape[0], table.shape[1])]
    return torch.cat(parts)


def tiled(tile_bytes: int):
    def run(q, k_pool, v_pool, table, mask):
        n = q.shape[0]
        tile = tile_blocks(k_pool, n, tile_bytes)
        return tiled_attention(q[:, None], k_pool, v_pool, table, mask, DIM ** -0.5, tile=tile)[:, 0]
    return run


def row_chunks(tile_bytes: int):
    """The gather path on sub-batches of rows whose gathered K fits `tile_bytes` (rows attend independently)."""
    def run(q, k_pool, v_pool, table, mask):
        per = max(1, tile_bytes // (table.shape[1] * k_pool[0].numel() * k_pool.element_size()))
        return torch.cat([gather(q[i:i + per], k_pool, v_pool, table[i:i + per], mask[i:i + per])
                          for i in range(0, q.shape[0], per)])
    return run


def compiled_kernel():
    def paged(q, k_pool, v_pool, table, mask):
        n, ctx = q.shape[0], mask.shape[-1]
        k = k_pool[table].view(n, ctx, KV_HEADS, 1, DIM)  # inductor folds the indexing into the loads
        v = v_pool[table].view(n, ctx, KV_HEADS, 1, DIM)
        s = (q.view(n, 1, KV_HEADS, -1, DIM) * k).sum(-1) * DIM ** -0.5  # [n, ctx, kv_heads, group]
        p = s.masked_fill(~mask.view(n, ctx, 1, 1), float("-inf")).softmax(1)
        return (p[..., None] * v).sum(1).reshape(n, -1)
    return torch.compile(paged, dynamic=True)


def best_ms(kinds: dict, inputs, reps: int) -> dict:
    """Best of `reps` calls of each kind, in milliseconds, the kinds taking turns (a load swing hits them all)."""
    times = {name: [] for name in kinds}
    for _ in range(reps):
        for name, fn in kinds.items():
            t = now()
            fn(*inputs)
            times[name].append(now() - t)
    return {name: round(min(ts) * 1e3, 3) for name, ts in times.items()}


def measure(kinds: dict, inputs, reps: int, row: dict) -> dict:
    """Check every kind against the first on `inputs` (max abs error), then time them; the row, printed."""
    ref = None
    for name, fn in kinds.items():
        t = time.perf_counter()
        out = fn(*inputs)
        row[f"{name}_first_call_s"] = round(time.perf_counter() - t, 2)
        ref = out if ref is None else ref
        row[f"{name}_err"] = (out - ref).abs().max().item()
    row.update(best_ms(kinds, inputs, reps))
    print(json.dumps(row), flush=True)
    return row


def attention_rows(args) -> list[dict]:
    kinds = {"gather": gather, "paged": paged}
    kinds.update({f"tiled-{mb}M": tiled(mb << 20) for mb in (1, 2, 4, 8)})
    kinds.update({f"rows-{mb}M": row_chunks(mb << 20) for mb in (2, 4, 8, 16)})
    if args.compiled:
        kinds["compiled"] = compiled_kernel()
    return [measure(kinds, case(n, ctx), args.reps, {"part": "attention", "batch": n, "context": ctx})
            for n in args.batches for ctx in args.contexts]


def prefill_rows(args) -> list[dict]:
    """One chunk of `lq` queries at the end of a context (chunked prefill, a speculative verify span)."""
    rows = []
    for ctx in args.prefill_contexts:
        for lq in (4, 64, 256):
            q, k_pool, v_pool, table, _ = case(1, ctx)
            mask = torch.arange(ctx)[None, None, :] <= (ctx - lq + torch.arange(lq))[None, :, None]
            q = torch.randn(1, lq, HEADS, DIM)

            def gathered(q, k_pool, v_pool, table, mask):
                k = k_pool.index_select(0, table[0]).view(1, ctx, KV_HEADS, DIM).transpose(1, 2)
                v = v_pool.index_select(0, table[0]).view(1, ctx, KV_HEADS, DIM).transpose(1, 2)
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
                                                     enable_gqa=True)
                return out.transpose(1, 2).reshape(1, lq, -1)

            def tiled_2m(q, k_pool, v_pool, table, mask):
                return tiled_attention(q, k_pool, v_pool, table, mask, DIM ** -0.5, tile=tile_blocks(k_pool, 1))
            kinds = {"gather": gathered, "tiled-2M": tiled_2m}
            rows.append(measure(kinds, (q, k_pool, v_pool, table, mask), args.reps,
                                {"part": "prefill", "queries": lq, "context": ctx}))
    return rows


def step_rows(args) -> list[dict]:
    from kvmesh.services.engine.batch import Chunk, build_batch
    from kvmesh.services.engine.kv_cache import KVCache
    from kvmesh.services.kv_identity import KVLayout
    from kvmesh.services.engine.model import LlamaModel

    model = LlamaModel.from_path(args.model, "float32")
    cfg, rows, n = model.config, [], 32
    for ctx in args.step_contexts:
        blocks = -(-(ctx + 1) // BLOCK)
        layout = KVLayout("bench", "float32", BLOCK, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        kv = KVCache(layout, n * blocks + 1)
        kv.pool.normal_()
        chunks = [Chunk([7], ctx, list(range(i * blocks, (i + 1) * blocks))) for i in range(n)]
        batch = build_batch(chunks, BLOCK, group_cost=model.decode_group_cost)
        row = {"part": "step", "model": Path(args.model).name, "batch": n, "context": ctx}
        for mode in ("gather", "paged"):
            model.attention, spent = mode, []
            attention = type(model)._attention

            def timed(*a, _f=attention):
                t = now()
                out = _f(model, *a)
                spent.append(now() - t)
                return out
            model._attention = timed
            times = []
            for _ in range(args.step_reps):
                spent.clear()
                t = now()
                model.forward(batch, kv)
                times.append((now() - t, sum(spent)))
            del model._attention
            step, attn = min(times)
            row[f"{mode}_step_ms"], row[f"{mode}_attention_share"] = round(step * 1e3, 1), round(attn / step, 3)
        row["paged_speedup"] = round(row["gather_step_ms"] / row["paged_step_ms"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=ints, default=[1, 8, 32])
    p.add_argument("--contexts", type=ints, default=[256, 512, 1024, 2048])
    p.add_argument("--step-contexts", type=ints, default=[256, 1024, 2048])
    p.add_argument("--step-reps", type=int, default=3)
    p.add_argument("--prefill-contexts", type=ints, default=[2048, 8192])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compiled", action="store_true", help="also torch.compile a kernel (needs a C++ compiler)")
    p.add_argument("--model", default=str(SMOLLM2))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--core", type=int, default=1)
    p.add_argument("--clock", choices=CLOCKS, default="cpu", help="cpu (process time; 1 thread) or wall")
    p.add_argument("--out", default="bench/paged_attention.json")
    args = p.parse_args(argv)
    global now
    now = CLOCKS[args.clock]
    os.sched_setaffinity(0, {args.core + i for i in range(args.threads)})
    torch.set_num_threads(args.threads)
    info = {"machine": machine(), "threads": args.threads, "clock": args.clock, "tile_bytes": TILE_BYTES,
            "cxx": shutil.which("c++") or shutil.which("g++")}
    rows = attention_rows(args) + prefill_rows(args) + (step_rows(args) if args.step_contexts else [])
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
