"""The circuit breaker: closed → open after N consecutive failures → half-open after the cool-down → closed."""

from kvmesh.services.scheduler.breaker import Breaker, BreakerState


def test_consecutive_failures_open_the_breaker_at_the_threshold():
    breaker = Breaker(failure_threshold=3, cooldown_s=2)
    breaker.record_failure(0.0)
    breaker.record_failure(0.1)
    assert breaker.current(0.2) is BreakerState.CLOSED and breaker.routable(0.2)
    breaker.record_failure(0.3)
    assert breaker.current(0.4) is BreakerState.OPEN and not breaker.routable(0.4)
    assert breaker.num_opened == 1


def test_a_healthy_check_ends_a_run_of_failures_while_closed():
    breaker = Breaker(failure_threshold=2)
    breaker.record_failure(0.0)
    breaker.record_healthy()
    breaker.record_failure(1.0)
    assert breaker.current(1.0) is BreakerState.CLOSED


def test_an_open_breaker_ignores_health_and_lets_one_probe_through_after_the_cooldown():
    breaker = Breaker(failure_threshold=1, cooldown_s=2, probe_window_s=1)
    breaker.record_failure(0.0)
    breaker.record_healthy()  # answering health checks is not enough to close it
    assert not breaker.routable(1.9)
    assert breaker.routable(2.0) and breaker.current(2.0) is BreakerState.HALF_OPEN
    breaker.routed(2.0)  # the probe
    assert not breaker.routable(2.5)  # one probe at a time
    assert breaker.routable(3.0) and breaker.current(3.0) is BreakerState.CLOSED  # no failure in its window


def test_a_failed_probe_reopens_and_restarts_the_cooldown():
    breaker = Breaker(failure_threshold=1, cooldown_s=2, probe_window_s=1)
    breaker.record_failure(0.0)
    breaker.routed(2.0)
    breaker.record_failure(2.5)
    assert breaker.current(3.5) is BreakerState.OPEN and not breaker.routable(4.4)
    assert breaker.routable(4.5)
    assert breaker.num_opened == 1  # re-opening from half-open is the same outage


def test_a_failure_while_open_restarts_the_cooldown():
    breaker = Breaker(failure_threshold=1, cooldown_s=2)
    breaker.record_failure(0.0)
    breaker.record_failure(1.5)  # a failed health check of a dead worker
    assert not breaker.routable(3.0)
    assert breaker.routable(3.5)


def test_success_closes_from_any_state():
    breaker = Breaker(failure_threshold=1)
    breaker.record_failure(0.0)
    breaker.record_success()
    assert breaker.current(0.0) is BreakerState.CLOSED and breaker.num_failures == 0
