"""What a decode worker reports for length-aware placement: the tokens its requests are still expected to
generate (max_tokens, capped by the mean output length once requests have finished) and that mean."""

import asyncio

from kvmesh.services.decode.load import Claims, expected_remaining


def test_remaining_tokens_follow_max_tokens_then_the_observed_mean():
    claims = Claims()
    claims.arrived("a", 4, max_tokens=100)
    claims.arrived("b", 4, max_tokens=10)
    assert claims.num_remaining_tokens == 110 and claims.mean_output_tokens == 0
    claims.generated("a", 30)
    assert claims.num_remaining_tokens == 80
    claims.generated("b", 10)
    asyncio.run(claims.finished("b"))  # no scheduler registered: nothing to wait for
    assert claims.mean_output_tokens == 10
    assert claims.num_remaining_tokens == 1  # "a" passed the mean: at least one more token while it runs
    claims.ended("a")
    assert claims.num_remaining_tokens == 0
    assert expected_remaining(100, 0, 10.0) == 10 and expected_remaining(5, 0, 10.0) == 5
