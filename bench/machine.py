"""What machine a benchmark ran on, recorded beside its figures: the CPU as `lscpu` names it, its flags (figures
from another CPU are not comparable: avx512_bf16 or not changes bfloat16 3-5x) and the load average."""

from __future__ import annotations

import os
import subprocess


def machine() -> dict:
    """`lscpu`'s model name, CPU count and flags, and the 1-minute load average."""
    info = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)", "Flags"):
            info[key.strip()] = value.strip()
    info["loadavg"] = os.getloadavg()[0]
    return info
