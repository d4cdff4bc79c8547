"""The summary table and the sweep's verdict."""

from kvmesh.services.bench.metrics import RequestResult, summarize
from kvmesh.services.bench.report import max_rate_at_target, summary_table, sweep_table


def point(attainment):
    return {"goodput_rps": 1.0, "slo_attainment_pct": attainment, "failed": 0, "ttft_ms": {"p99": 1.0},
            "tpot_ms": {"p99": 1.0}}


def test_the_max_rate_is_the_highest_that_reached_the_target():
    points = [(1.0, point(100.0)), (2.0, point(92.0)), (4.0, point(60.0)), (8.0, point(91.0))]
    assert max_rate_at_target(points) == 8.0  # not monotone on a noisy machine: the highest passing rate counts
    assert max_rate_at_target([(1.0, point(89.9))]) is None
    assert "none of the swept rates" in sweep_table([(1.0, point(10.0))])


def test_the_summary_table_names_every_distribution_and_the_errors():
    s = summarize([RequestResult(ttft_s=0.1, e2e_s=0.3, output_tokens=3, token_times_s=[0.1, 0.2, 0.3]),
                   RequestResult(error="UNAVAILABLE")], duration_s=1.0)
    table = summary_table(s)
    for label in ("P99 TTFT (ms)", "P50 TPOT (ms)", "MEAN ITL (ms)", "P90 E2E (ms)", "Goodput (req/s)"):
        assert label in table
    assert '"UNAVAILABLE": 1' in table
