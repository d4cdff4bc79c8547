"""`kvmesh plan profile`: measure this machine's cost models with the real engine and fit them.

Prefill: steps that each prefill `batch` whole prompts of n tokens (max_tokens=1), timed around `step()`.
Decode: `batch` sequences of `context` prompt tokens, joined as prefilled, then a few timed decode steps, each recorded with the batch's total context at that step; the fit takes each shape's fastest step. Transfer: a warm buffer copied twice (a
producer's write into a shared segment and the consumer's copy out: the shared-memory handoff's two copies).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvmesh.services.plan.costs import Profile, fit_decode, fit_prefill


@dataclass(frozen=True)
class ProfileGrid:
    """The shapes measured; `reps` timings of each (the fastest kept: noise on a shared machine only adds)."""

    prompt_lengths: tuple[int, ...] = (32, 128, 512, 1024)
    prefill_batches: tuple[int, ...] = (1, 2)
    decode_batches: tuple[int, ...] = (1, 4, 16, 32)
    decode_contexts: tuple[int, ...] = (64, 256, 768)
    decode_steps: int = 5
    reps: int = 2


QUICK = ProfileGrid((16, 128, 256), (1, 2), (1, 8, 32), (32, 256), 3, 2)


def cpu_info() -> dict:
    """`lscpu`'s model name, core count and flags (what decides bf16 vs fp32 speed here)."""
    # the load while profiling says how far to trust the figures on a shared machine
    info = {"machine": platform.machine(), "model_name": platform.processor(), "cpus": None, "flags": "",
            "loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info["model_name"] = fields.get("Model name", info["model_name"]).strip()
    info["cpus"] = fields.get("CPU(s)", "").strip()
    info["flags"] = fields.get("Flags", "").strip()
    return info


def measure_transfer_gbps(nbytes: int = 64 << 20) -> float:
    """GB/s of the shared-memory handoff's two warm copies (producer in, consumer out), best of three."""
    src = np.ones(nbytes, dtype=np.uint8)
    segment, dst = np.empty_like(src), np.empty_like(src)
    np.copyto(segment, src), np.copyto(dst, segment)  # fault the pages in first: segments are reused warm
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(segment, src)
        np.copyto(dst, segment)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _engine(model_dir: str, max_seqs: int, max_tokens: int, max_len: int):
    from kvmesh.services.engine.engine import LLMEngine

    num_blocks = max_seqs * (-(-max_len // 16) + 1) + 8  # every sequence fits: no preemption while timing
    return LLMEngine.from_path(model_dir, block_size=16, num_blocks=num_blocks, max_num_seqs=max_seqs,
                               max_num_batched_tokens=max_tokens)


def _prompt(engine, n: int, salt: int) -> list[int]:
    rng = np.random.default_rng(n * 7919 + salt)
    return rng.integers(3, engine.vocab_size, n).tolist()


def time_prefill(engine, n: int, batch: int, salt: int) -> float:
    """Seconds of one step that prefills `batch` prompts of n tokens."""
    from kvmesh.services.engine.sampler import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"p{salt}-{i}", _prompt(engine, n, salt * 31 + i), params)
    t = time.perf_counter()
    engine.step()
    seconds = time.perf_counter() - t
    while engine.has_unfinished():
        engine.step()
    return seconds


def time_decode(engine, context: int, batch: int, steps: int, salt: int) -> list[tuple[int, int, float]]:
    """(batch, total context tokens, seconds) of `steps` decode steps of `batch` sequences of `context` tokens.

    The sequences join as a decode worker's do (reserve, then add_prefilled): their KV is the pool's zeros, not
    a prefill's, which changes no step's cost and spares a prefill of every batch before it is timed."""
    from kvmesh.services.engine.sampler import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        rid, prompt = f"d{salt}-{i}", _prompt(engine, context, salt * 37 + i)
        engine.reserve(rid, context)
        engine.add_prefilled(rid, prompt, prompt[-1], params)
    rows = []
    for s in range(steps):
        # each sequence holds its prompt and the s + 1 tokens made so far when this step runs
        total = batch * (context + s + 1)
        t = time.perf_counter()
        engine.step()
        rows.append((batch, total, time.perf_counter() - t))
    while engine.has_unfinished():
        engine.step()
    return rows


def run_profile(model_dir: str, grid: ProfileGrid = ProfileGrid(), threads: int = 1,
                progress: Callable[[str, int, int], None] | None = None) -> Profile:
    """Measure and fit this machine's cost models for the model at model_dir."""
    import torch

    torch.set_num_threads(threads)
    note = progress or (lambda *_: None)
    max_len = max(max(grid.prompt_lengths), max(grid.decode_contexts) + grid.decode_steps + 2)
    seqs = max(max(grid.prefill_batches), max(grid.decode_batches))
    engine = _engine(model_dir, seqs, max(max(grid.prompt_lengths) * max(grid.prefill_batches),
                                          max(grid.decode_contexts) * max(grid.decode_batches)) + 64, max_len)
    time_prefill(engine, min(grid.prompt_lengths), 1, 0)  # warm-up: first calls pay allocation and dispatch
    shapes = [(n, b) for n in grid.prompt_lengths for b in grid.prefill_batches]
    prefill_rows = []
    for i, (n, b) in enumerate(shapes):
        note("prefill", i, len(shapes))
        seconds = min(time_prefill(engine, n, b, i * 10 + r + 1) for r in range(grid.reps))
        prefill_rows.append(([n] * b, seconds))
    shapes = [(c, b) for c in grid.decode_contexts for b in grid.decode_batches]
    decode_rows, every_step = [], []
    for i, (c, b) in enumerate(shapes):
        note("decode", i, len(shapes))
        steps = [row for r in range(grid.reps)
                 for row in time_decode(engine, c, b, grid.decode_steps, 1000 + i * 10 + r)]
        every_step += steps
        # the fastest step of a shape: on a shared machine noise only ever adds time
        decode_rows.append(min(steps, key=lambda row: row[2]))
    note("transfer", 0, 1)
    gbps = measure_transfer_gbps()
    note("done", 0, 1)
    layout = engine.layout
    return Profile(
        fit_prefill([r[0] for r in prefill_rows], [r[1] for r in prefill_rows]),
        fit_decode(*zip(*decode_rows)),
        2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * layout.itemsize,
        round(gbps, 3), str(model_dir), cpu_info(),
        {"prefill": [{"prompt_lengths": p, "seconds": s} for p, s in prefill_rows],
         "decode": [{"batch": b, "context_tokens": c, "seconds": s} for b, c, s in decode_rows],
         "decode_every_step": [[b, c, s] for b, c, s in every_step],
         "threads": threads, "python": sys.version.split()[0]})
