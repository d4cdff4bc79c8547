"""Arrival schedules: mean rates, gamma burstiness, constant spacing, all-at-once and trace replay."""

import math
import statistics

import pytest

from kvmesh.services.bench import arrivals

N = 20000


def gaps(offsets):
    return [b - a for a, b in zip(offsets, offsets[1:])]


def test_poisson_arrivals_have_the_asked_mean_rate_and_exponential_gaps():
    offsets = arrivals.offsets(N, rate=50.0, burstiness=1.0, seed=1)
    g = gaps(offsets)
    assert statistics.fmean(g) == pytest.approx(1 / 50, rel=0.03)
    # an exponential distribution's coefficient of variation is 1
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(1.0, rel=0.05)
    assert offsets[0] == 0.0 and all(x >= 0 for x in g)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_the_rate_and_sets_the_variation(burstiness):
    g = gaps(arrivals.offsets(N, rate=20.0, burstiness=burstiness, seed=2))
    assert statistics.fmean(g) == pytest.approx(1 / 20, rel=0.05)
    # gamma(k, theta): CV^2 = 1 / k, so bursty traffic (k < 1) varies more than Poisson and steady (k > 1) less
    assert (statistics.pstdev(g) / statistics.fmean(g)) ** 2 == pytest.approx(1 / burstiness, rel=0.1)


def test_constant_arrivals_are_evenly_spaced():
    assert arrivals.offsets(5, rate=4.0, process="constant") == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_an_infinite_rate_sends_everything_at_once():
    assert arrivals.offsets(3, rate=math.inf) == [0.0, 0.0, 0.0]


def test_a_seed_fixes_the_schedule():
    assert arrivals.offsets(100, 10.0, 0.5, seed=7) == arrivals.offsets(100, 10.0, 0.5, seed=7)
    assert arrivals.offsets(100, 10.0, 0.5, seed=7) != arrivals.offsets(100, 10.0, 0.5, seed=8)


def test_trace_timestamps_replay_from_the_first_and_scale():
    assert arrivals.from_timestamps([1000.0, 1500.0, 3000.0]) == [0.0, 0.5, 2.0]
    assert arrivals.from_timestamps([1000.0, 1500.0, 3000.0], time_scale=0.5) == [0.0, 0.25, 1.0]


@pytest.mark.parametrize("kwargs", [{"rate": 0.0}, {"rate": -1.0}, {"rate": 1.0, "burstiness": 0.0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        arrivals.offsets(3, **kwargs)
    with pytest.raises(ValueError):
        arrivals.from_timestamps([0.0], time_scale=0)
