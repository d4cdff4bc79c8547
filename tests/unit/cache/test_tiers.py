"""The DRAM tier: a byte budget kept by LRU eviction."""

import random

import pytest

from kvmesh.services.cache.tiers import TIERS, DramTier
from kvmesh.services.common.errors import CapacityError, InvalidArgumentError


def test_lru_evicts_the_least_recently_used_and_stays_within_budget():
    tier = DramTier(capacity_bytes=300)
    for key in "abc":
        assert tier.put(key, b"x" * 100) == (True, 0)
    assert tier.get("a") is not None  # a is now the most recent; b is the oldest
    assert tier.put("d", b"y" * 100) == (True, 1)
    assert list(tier) == ["c", "a", "d"]
    assert tier.num_bytes == 300 and tier.num_evictions == 1


def test_random_puts_never_exceed_the_budget():
    rng = random.Random(0)
    tier = DramTier(capacity_bytes=10_000)
    for i in range(2000):
        tier.put(i % 300, bytes(rng.randint(1, 2500)))
        assert tier.num_bytes <= tier.capacity_bytes
        assert tier.num_bytes == sum(len(tier.get(k)) for k in list(tier))
    assert tier.num_evictions > 0


def test_put_is_idempotent():
    tier = DramTier(capacity_bytes=1000)
    assert tier.put("a", b"1234") == (True, 0)
    assert tier.put("a", b"1234") == (False, 0)
    assert (len(tier), tier.num_bytes) == (1, 4)


def test_oversized_or_empty_blocks_are_refused():
    tier = DramTier(capacity_bytes=10)
    with pytest.raises(CapacityError):
        tier.put("a", bytes(11))
    with pytest.raises(InvalidArgumentError):
        tier.put("a", b"")
    assert len(tier) == 0 and tier.num_bytes == 0


def test_clear_and_registry():
    tier = TIERS["dram"](capacity_bytes=100)
    tier.put("a", b"1")
    tier.put("b", b"2")
    assert tier.clear() == 2 and tier.num_bytes == 0 and not tier.contains("a")
