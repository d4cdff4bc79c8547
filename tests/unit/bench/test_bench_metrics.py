"""Aggregates against values worked out by hand: percentiles, TPOT, ITL, throughput, goodput, attainment."""

import math

import numpy as np
import pytest

from kvmesh.services.bench.metrics import RequestResult, Slo, percentile, summarize


def test_percentiles_interpolate_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    many = [float(x) for x in np.random.default_rng(0).exponential(size=1001)]
    for q in (50, 90, 99):
        assert percentile(many, q) == pytest.approx(float(np.percentile(many, q)))
    assert math.isnan(percentile([], 50))


def results():
    return [
        RequestResult(ttft_s=0.1, e2e_s=1.1, output_tokens=11, prompt_tokens=10, token_times_s=[0.1, 0.3, 0.6],
                      cached_tokens=4),
        RequestResult(ttft_s=0.5, e2e_s=0.7, output_tokens=3, prompt_tokens=10, token_times_s=[0.5, 0.6],
                      cached_tokens=0),
        RequestResult(ttft_s=0.2, e2e_s=2.2, output_tokens=5, prompt_tokens=10, token_times_s=[0.2]),
        RequestResult(error="http_503", prompt_tokens=10),
    ]


def test_tpot_excludes_the_first_token():
    r = results()
    assert r[0].tpot_s == pytest.approx(0.1)  # (1.1 - 0.1) / (11 - 1)
    assert r[2].tpot_s == pytest.approx(0.5)
    assert r[3].tpot_s is None and RequestResult(ttft_s=0.1, e2e_s=0.1, output_tokens=1).tpot_s is None


def test_summary_against_hand_computed_values():
    s = summarize(results(), duration_s=2.0, slo=Slo(ttft_ms=300, tpot_ms=200))
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, {"http_503": 1})
    assert s["output_tok_s"] == pytest.approx(19 / 2)
    assert s["total_tok_s"] == pytest.approx((19 + 30) / 2)
    assert s["request_rps"] == pytest.approx(1.5)
    assert s["cached_prompt_tokens"] == 4
    # only the first request meets both SLOs: the second misses TTFT, the third TPOT, the fourth failed
    assert s["goodput_rps"] == pytest.approx(0.5)
    assert s["slo_attainment_pct"] == pytest.approx(25.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(800 / 3)
    assert s["ttft_ms"]["p50"] == pytest.approx(200)
    assert s["ttft_ms"]["p90"] == pytest.approx(440)
    assert s["ttft_ms"]["p99"] == pytest.approx(494)
    assert s["itl_ms"]["count"] == 3 and s["itl_ms"]["p50"] == pytest.approx(200)
    assert s["tpot_ms"]["p50"] == pytest.approx(100)
    assert s["e2e_ms"]["mean"] == pytest.approx(4000 / 3)


def test_without_slos_every_completed_request_is_good():
    s = summarize(results(), duration_s=2.0)
    assert s["goodput_rps"] == pytest.approx(1.5)
    assert s["slo_attainment_pct"] == pytest.approx(75.0)


def test_a_run_with_nothing_completed_reports_nulls_not_nans():
    s = summarize([RequestResult(error="UNAVAILABLE")], duration_s=1.0)
    assert s["completed"] == 0 and s["ttft_ms"]["p99"] is None and s["cached_prompt_tokens"] is None
