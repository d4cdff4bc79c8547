"""PNG plots of a run (TTFT and ITL CDFs, output tokens over time) and of a sweep (goodput and attainment vs
rate). matplotlib is optional (`pip install 'kvmesh[bench]'`); without it `--plot` says so and the run's other
outputs are unaffected."""

from __future__ import annotations

from kvmesh.services.bench.metrics import RequestResult


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed: pip install 'kvmesh[bench]' "
                              "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_ms: list[float], title: str) -> None:
    ordered = sorted(values_ms)
    ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))] if ordered else [])
    ax.set_xlabel(f"{title} (ms)")
    ax.set_ylabel("fraction of samples")
    ax.set_title(f"{title} CDF")
    ax.grid(alpha=0.3)


def plot_run(results: list[RequestResult], path: str) -> None:
    """Three panels: TTFT CDF, ITL CDF, output tokens completed per second over the run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    done = [r for r in results if r.ok]
    _cdf(axes[0], [r.ttft_s * 1000 for r in done if r.ttft_s is not None], "TTFT")
    _cdf(axes[1], [g * 1000 for r in done for g in r.itl_s], "ITL")
    # a message's tokens are credited at its arrival; requests' own clocks are offset by their start
    stamps = sorted(r.start_s + t for r in done for t in r.token_times_s)
    if stamps:
        bin_s = max(stamps[-1] / 50, 0.05)  # about 50 points whatever the run's length
        counts = [0] * (int(stamps[-1] / bin_s) + 1)
        for t in stamps:
            counts[int(t / bin_s)] += 1
        axes[2].plot([i * bin_s for i in range(len(counts))], [c / bin_s for c in counts])
    axes[2].set_xlabel("time since start (s)")
    axes[2].set_ylabel("token messages / s")
    axes[2].set_title("output over time")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(points: list[tuple[float, dict]], path: str) -> None:
    """Goodput and SLO attainment against the offered request rate."""
    plt = _pyplot()
    fig, left = plt.subplots(figsize=(7, 4))
    rates = [rate for rate, _ in points]
    left.plot(rates, [s["goodput_rps"] for _, s in points], marker="o", label="goodput (req/s)")
    left.set_xlabel("offered rate (req/s)")
    left.set_ylabel("goodput (req/s)")
    right = left.twinx()
    right.plot(rates, [s["slo_attainment_pct"] or 0 for _, s in points], marker="s", color="tab:orange",
               label="SLO attainment (%)")
    right.axhline(90, color="tab:orange", linestyle=":", alpha=0.6)
    right.set_ylabel("SLO attainment (%)")
    right.set_ylim(0, 105)
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    fig.legend(loc="lower right", bbox_to_anchor=(0.88, 0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
