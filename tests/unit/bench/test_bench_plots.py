"""`--plot` without matplotlib says what to install and leaves the run's other outputs alone."""

import sys

import pytest

from kvmesh.services.bench import plots
from kvmesh.services.bench.metrics import RequestResult


def test_a_missing_matplotlib_is_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(plots.PlotUnavailable, match="pip install"):
        plots.plot_run([RequestResult(ttft_s=0.1, e2e_s=0.2, output_tokens=2, token_times_s=[0.1, 0.2])],
                       str(tmp_path / "run.png"))
    assert not (tmp_path / "run.png").exists()


def test_plots_are_written_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    results = [RequestResult(start_s=i * 0.1, ttft_s=0.05, e2e_s=0.2, output_tokens=3,
                             token_times_s=[0.05, 0.1, 0.2]) for i in range(20)]
    plots.plot_run(results, str(tmp_path / "run.png"))
    summary = {"goodput_rps": 1.0, "slo_attainment_pct": 95.0}
    plots.plot_sweep([(1.0, summary), (2.0, {**summary, "slo_attainment_pct": 80.0})], str(tmp_path / "sweep.png"))
    assert (tmp_path / "run.png").stat().st_size > 0 and (tmp_path / "sweep.png").stat().st_size > 0
