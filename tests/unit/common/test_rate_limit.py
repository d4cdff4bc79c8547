"""Per-tenant token buckets: a burst goes through, the next request waits what the rate says, tenants apart."""

import pytest

from kvmesh.services.common.rate_limit import TenantLimits


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_through_then_the_next_request_waits_one_tokens_time():
    clock = Clock()
    limits = TenantLimits(rate_per_minute=6, burst=3, clock=clock)
    assert [limits.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limits.take("a") == pytest.approx(10.0)  # 6 a minute: a token every 10 s
    clock.now += 4
    assert limits.take("a") == pytest.approx(6.0)  # a refusal takes nothing: the wait only shrinks
    clock.now += 6
    assert limits.take("a") == 0.0 and limits.take("a") > 0


def test_tenants_have_their_own_buckets_and_idle_time_refills_only_up_to_the_burst():
    clock = Clock()
    limits = TenantLimits(rate_per_minute=60, burst=2, clock=clock)
    assert limits.take("a") == limits.take("a") == 0.0 and limits.take("a") > 0
    assert limits.take("b") == 0.0  # another tenant is untouched
    clock.now += 3600
    assert [limits.take("a") for _ in range(3)][:2] == [0.0, 0.0] and limits.take("a") > 0


def test_burst_defaults_to_a_minutes_worth_and_retry_after_is_whole_seconds():
    assert TenantLimits(30).burst == 30 and TenantLimits(0.5).burst == 1
    assert TenantLimits.retry_after(0.01) == 1 and TenantLimits.retry_after(2.2) == 3
    assert "tenant 'team-a' may send 30 requests a minute" in TenantLimits(30).message("team-a", 1.5)
