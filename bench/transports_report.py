"""The transport micro-benchmark's report: a plot, the issue's goals checked against the run's own baselines, and
a markdown table appended to bench/RESULTS.md (used by transports.py)."""

from __future__ import annotations

import time
from pathlib import Path

MiB = 1 << 20


def plot(rows: list[dict], path: Path) -> None:
    """GB/s per backend against transfer size, with the run's memcpy, TCP and bare-gRPC baselines, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = sorted({r["size_bytes"] for r in rows})
    for backend in sorted({r["backend"] for r in rows}):
        ax.plot([s / MiB for s in sizes], [next(r["gbps"] for r in rows if r["backend"] == backend
                                                and r["size_bytes"] == s) for s in sizes], "o-", label=backend)
    for key, style in (("memcpy_gbps", "k--"), ("tcp_gbps", "k:"), ("grpc_ceiling_gbps", "k-.")):
        ax.plot([s / MiB for s in sizes], [next(r[key] for r in rows if r["size_bytes"] == s) for s in sizes],
                style, label=key.replace("_gbps", "").replace("_", " "))
    ax.set(xscale="log", yscale="log", xlabel="transfer size (MiB)", ylabel="GB/s", title="kvmesh KV transports")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def goals(rows: list[dict]) -> list[str]:
    """The issue's four goals, checked against this run's own baselines."""
    at = {(r["backend"], r["size_bytes"]): r for r in rows}
    big = max(r["size_bytes"] for r in rows)
    checks = []
    for backend, key, factor, what in (("shm", "memcpy_gbps", 0.5, "memcpy"), ("grpc", "tcp_gbps", 0.5, "raw TCP"),
                                       ("ucx", "tcp_gbps", 1.0, "raw TCP")):
        r = at.get((backend, big))
        if r:
            ratio = r["gbps"] / r[key]
            checks.append(f"{backend} at {big // MiB} MiB ≥ {factor} × {what}: {ratio:.2f}× — "
                          f"{'met' if ratio >= factor else 'not met'}")
    for backend in sorted({r["backend"] for r in rows}):
        small, large = at.get((backend, MiB)), at.get((backend, big))
        if small and large:
            ratio = small["gbps"] / large["gbps"]
            checks.append(f"{backend} at 1 MiB ≥ 0.5 × at {big // MiB} MiB: {ratio:.2f}× — "
                          f"{'met' if ratio >= 0.5 else 'not met'}")
    return checks


def fixed_ms(row: dict, rows: list[dict]) -> float:
    """A transfer's time beyond moving its bytes at the backend's largest-size rate: its fixed cost."""
    big = max((r for r in rows if r["backend"] == row["backend"]), key=lambda r: r["size_bytes"])
    return (row["size_bytes"] / row["gbps"] - row["size_bytes"] / big["gbps"]) / 1e6


def write_results(rows: list[dict], command: str, path: Path, png: Path, one_loop: dict | None) -> None:
    """Append this run's table, goals and one-loop figures to the markdown file `path`."""
    loads = [r["loadavg_1m"] for r in rows]
    lines = ["", f"## Transports ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "", f"`{command}`", "",
             f"1-minute load average on the 2 cores during the run: {min(loads):.1f}–{max(loads):.1f}.", "",
             "| backend | size | in flight | GB/s | GB/s after Open | memcpy GB/s | raw TCP GB/s | bare gRPC GB/s | vs memcpy "
             "| vs TCP | Open ms | Commit ms | fixed ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['size_bytes'] // MiB} MiB | {r.get('window', 1)} | {r['gbps']:.2f} | {r['gbps_after_open']:.2f} "
                     f"| {r['memcpy_gbps']:.2f} | {r['tcp_gbps']:.2f} | {r['grpc_ceiling_gbps']:.2f} "
                     f"| {r['gbps'] / r['memcpy_gbps']:.2f} | {r['gbps'] / r['tcp_gbps']:.2f} "
                     f"| {r['open_ms']:.2f} | {r['commit_ms']:.2f} | {fixed_ms(r, rows):.2f} |")
    lines += ["", "Goals, from this run:", ""] + [f"- {check}" for check in goals(rows)]
    if one_loop:
        lines += ["", "A staged shm transfer of 1 MiB with sender and receiver on one event loop (no process woken), "
                  "median µs: " + ", ".join(f"{k[:-3]} {v:.0f}" for k, v in one_loop.items() if k != "bytes_us")
                  + f"; of the total, moving the bytes (copy + xxh3 on each side) is {one_loop['bytes_us']:.0f}."]
    lines += ["", f"![transports]({png.name})", ""]
    with open(path, "a") as f:
        f.write("\n".join(lines))
