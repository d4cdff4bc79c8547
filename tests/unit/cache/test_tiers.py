"""Tiers: a byte budget kept by LRU eviction that skips protected blocks; the SSD tier's files."""

import random

import pytest

from kvmesh.services.cache import blockfile
from kvmesh.services.cache.tiers import TIERS, DramTier, SsdTier
from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.services.kv_identity import checksum

L = bytes(16)


def put(tier, key, data, protected=None):
    return tier.put(key, data, len(data), protected)


def test_lru_evicts_the_least_recently_used_and_stays_within_budget():
    tier = DramTier(capacity_bytes=300)
    for key in "abc":
        assert put(tier, key, b"x" * 100) == []
    tier.touch("a")  # a is now the most recent; b is the oldest
    assert put(tier, "d", b"y" * 100) == ["b"]
    assert list(tier) == ["c", "a", "d"]
    assert tier.num_bytes == 300 and tier.num_evictions == 1


def test_random_puts_never_exceed_the_budget():
    rng = random.Random(0)
    tier = DramTier(capacity_bytes=10_000)
    for i in range(2000):
        put(tier, i % 300, bytes(rng.randint(1, 2500)))
        assert tier.num_bytes <= tier.capacity_bytes
        assert tier.num_bytes == sum(len(tier.read(k)) for k in tier)
    assert tier.num_evictions > 0


def test_protected_blocks_are_never_evicted_and_a_block_that_cannot_fit_is_refused():
    tier = DramTier(capacity_bytes=200)
    put(tier, "pinned", b"p" * 100)
    put(tier, "b", b"b" * 100)
    assert put(tier, "c", b"c" * 100, protected=lambda k: k == "pinned") == ["b"]
    assert put(tier, "d", b"d" * 150, protected=lambda k: True) is None
    assert tier.contains("pinned") and tier.contains("c") and not tier.contains("d")
    assert tier.num_bytes == 200


def test_put_is_idempotent_and_empty_blocks_are_refused():
    tier = DramTier(capacity_bytes=1000)
    assert put(tier, "a", b"1234") == [] and put(tier, "a", b"1234") == []
    assert (len(tier), tier.num_bytes) == (1, 4)
    with pytest.raises(InvalidArgumentError):
        put(tier, "e", b"")
    assert tier.clear() == 1 and tier.num_bytes == 0 and TIERS["dram"] is DramTier


def test_ssd_tier_files_survive_a_restart_and_a_flipped_byte_is_detected(tmp_path):
    tier = SsdTier(10_000, tmp_path)
    for i in range(3):
        key = (L, bytes([i]) * 16)
        assert tier.put(key, tier.stage(key, bytes([i]) * 100, checksum(bytes([i]) * 100)), 100) == []
    again = SsdTier(10_000, tmp_path)
    assert again.recover() == 3 and again.num_bytes == 300
    assert again.read((L, bytes([1]) * 16)) == bytes([1]) * 100
    path = again.path((L, bytes([2]) * 16))
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(blockfile.CorruptBlockError):
        again.read((L, bytes([2]) * 16))


def test_ssd_recovery_drops_torn_files_and_leftover_temporaries(tmp_path):
    tier = SsdTier(10_000, tmp_path)
    key = (L, b"k" * 16)
    tier.put(key, tier.stage(key, b"z" * 100, checksum(b"z" * 100)), 100)
    tier.stage((L, b"t" * 16), b"t" * 100, 0)  # an interrupted write: never renamed
    path = tier.path(key)
    path.write_bytes(path.read_bytes()[:-10])  # torn
    again = SsdTier(10_000, tmp_path)
    assert again.recover() == 0
    assert list(tmp_path.iterdir()) == []


def test_ssd_recovery_keeps_within_budget(tmp_path):
    tier = SsdTier(10_000, tmp_path)
    for i in range(5):
        key = (L, bytes([i]) * 16)
        tier.put(key, tier.stage(key, b"x" * 100, checksum(b"x" * 100)), 100)
    again = SsdTier(250, tmp_path)
    assert again.recover() == 2 and again.num_bytes == 200
    assert len(list(tmp_path.iterdir())) == 2
