"""Which dtype the weights and the KV cache take: `--dtype auto` follows the hardware, not only the checkpoint.

On a CPU without native bfloat16 instructions (no AVX-512-BF16, no AMX; e.g. an AVX2-only AMD EPYC) every bf16
matmul converts to float32 and back: measured on such a machine (issue #18) bf16 decode ran 1.3x slower than
float32 at batch 1 and 3-5x slower at batch 8-32, for vLLM's CPU build too. So on the CPU "auto" takes bfloat16
only where the CPU has it natively and the checkpoint is 16-bit, and float32 otherwise; on CUDA it keeps the
checkpoint's dtype. The choice is the KV layout's dtype as well, so two workers of one mesh on the same kind of
CPU choose alike; workers whose layouts differ are never paired by the scheduler (its routes need layouts equal but
for the block size).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# /proc/cpuinfo flags meaning native bf16 arithmetic: x86's AVX-512-BF16 and AMX-BF16, aarch64's BF16 extension
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
BF16_COST = ("1.3x slower than float32 at batch 1 and 3-5x slower at batch 8-32 (measured on an AVX2-only "
             "AMD EPYC, issue #18)")
_warned: set[str] = set()


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (x86 `flags`, aarch64 `Features`); empty if unreadable."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively (flags default to this machine's /proc/cpuinfo; without it,
    torch's own probe where this build has one)."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return any(f in flags for f in NATIVE_BF16_FLAGS)
    probe = getattr(getattr(torch._C, "_cpu", None), "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def choose_dtype(requested: str, checkpoint_dtype: str, device: str,
                 flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(dtype name, why) for a `--dtype` value, the checkpoint's dtype and the device."""
    on_cpu = str(device).split(":")[0] == "cpu"
    if requested != "auto":
        if requested == "bfloat16" and on_cpu and not has_native_bf16(flags):
            return requested, f"--dtype bfloat16 as asked, but this CPU has no native bf16: {BF16_COST}"
        return requested, f"--dtype {requested} as asked"
    if not on_cpu:
        return checkpoint_dtype, f"auto on {device}: the checkpoint's {checkpoint_dtype}"
    if checkpoint_dtype == "float32":
        return "float32", "auto: the checkpoint is float32"
    if has_native_bf16(flags):
        return "bfloat16", f"auto: the checkpoint is {checkpoint_dtype} and this CPU has native bf16"
    return "float32", (f"auto: the checkpoint is {checkpoint_dtype} but this CPU has no native bf16 "
                       f"(no {', '.join(NATIVE_BF16_FLAGS[:2])}), where bf16 is {BF16_COST}")


def resolve_dtype(requested: str, checkpoint_dtype: str, device: str) -> str:
    """`choose_dtype` for this machine, logging the choice in one line (warning once per process when an explicit
    bfloat16 takes the slow path)."""
    name, why = choose_dtype(requested, checkpoint_dtype, device)
    if "no native bf16" in why and requested == "bfloat16":
        if why not in _warned:
            _warned.add(why)
            log.warning("dtype %s: %s; --dtype auto would run float32", name, why)
    else:
        log.info("dtype %s: %s", name, why)
    return name
