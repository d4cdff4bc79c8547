"""The store over DRAM and SSD: write-through behind the request, promotion, pins, leases, restarts, corruption —
and a property test over random sequences of all of them."""

import hashlib
import tempfile
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.services.cache.blockfile import HEADER_BYTES
from kvmesh.services.cache.store import BlockStore
from kvmesh.services.cache.tiers import DramTier, SsdTier
from kvmesh.services.kv_identity import checksum

LAYOUT = b"layout"
HASHES = [hashlib.blake2b(bytes([i]), digest_size=16).digest() for i in range(12)]


def block(i: int) -> bytes:
    """What block i holds: its size and bytes depend on i, so a mix-up shows."""
    return hashlib.shake_128(bytes([i])).digest(50 + 10 * i)


def make(directory, dram=400, ssd=800) -> BlockStore:
    return BlockStore(DramTier(dram), SsdTier(ssd, directory))


def put(store, i):
    return store.put_verified(LAYOUT, HASHES[i], block(i), checksum(block(i)))


def test_blocks_evicted_from_dram_are_served_from_ssd_and_promoted(tmp_path):
    store = make(tmp_path, dram=200)
    for i in range(4):
        put(store, i)
    store.flush()
    assert store.lookup(LAYOUT, HASHES[:4]).ssd >= 1  # the DRAM tier could not hold all four
    got = store.get(LAYOUT, HASHES[:4])
    assert [d for _, d, _ in got] == [block(i) for i in range(4)]
    assert "ssd" in {t for _, _, t in got}
    assert store.dram.num_bytes <= 200
    store.close()


def test_a_warm_ssd_tier_serves_hits_after_a_restart(tmp_path):
    store = make(tmp_path)
    for i in range(3):
        put(store, i)
    store.close()
    again = make(tmp_path)
    assert again.lookup(LAYOUT, HASHES[:4]).ssd == 3
    assert [d for _, d, _ in again.get(LAYOUT, HASHES[:3])] == [block(i) for i in range(3)]
    again.close()


def test_a_block_file_with_one_flipped_byte_is_never_served(tmp_path):
    store = make(tmp_path)
    for i in range(3):
        put(store, i)
    store.close()
    path = SsdTier(800, tmp_path).path((hashlib.blake2b(LAYOUT, digest_size=16).digest(), HASHES[1]))
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 5] ^= 0x20
    path.write_bytes(bytes(raw))
    again = make(tmp_path)
    got = again.get(LAYOUT, HASHES[:3])
    assert [d for _, d, _ in got] == [block(0)]  # stops at the corrupt block
    assert again.stats.corrupt_blocks == 1 and not path.exists()
    assert again.lookup(LAYOUT, HASHES[:3]).total == 1
    again.close()


def test_pinned_blocks_outlive_pressure_and_unpinned_ones_do_not(tmp_path):
    store = BlockStore(DramTier(200))
    put(store, 0)
    assert store.pin(LAYOUT, HASHES[:1]) == 1
    for i in range(1, 8):
        put(store, i)
    assert store.lookup(LAYOUT, HASHES[:1]).dram == 1
    assert store.unpin(LAYOUT, HASHES[:1]) == 1
    for i in range(1, 8):
        put(store, i)
    assert store.lookup(LAYOUT, HASHES[:1]).total == 0


def test_a_chain_loses_its_tail_before_its_head():
    store = BlockStore(DramTier(sum(len(block(i)) for i in range(4))))
    for i in range(4):
        put(store, i)
    store.lookup(LAYOUT, HASHES[:4])
    put(store, 4)  # room for block 4 comes from the chain's tail, not its head
    assert store.lookup(LAYOUT, HASHES[:4]).total >= 2


OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 11)),
    st.tuples(st.just("get"), st.integers(1, 12)),
    st.tuples(st.just("pin"), st.integers(0, 11)),
    st.tuples(st.just("unpin"), st.integers(0, 11)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("restart"), st.just(0)),
    st.tuples(st.just("corrupt"), st.integers(0, 11)),
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_random_sequences_keep_the_budgets_and_never_serve_other_bytes(ops):
    with tempfile.TemporaryDirectory() as d:
        store, pinned = make(d), set()
        for op, arg in ops:
            if op == "put":
                put(store, arg)
            elif op == "get":
                got = store.get(LAYOUT, HASHES[:arg])
                assert [h for h, _, _ in got] == HASHES[:len(got)]
                assert all(data == block(i) for i, (_, data, _) in enumerate(got))
            elif op == "pin" and store.pin(LAYOUT, HASHES[arg:arg + 1]):
                pinned.add(arg)
            elif op == "unpin" and arg in pinned:
                store.unpin(LAYOUT, HASHES[arg:arg + 1])
                pinned.discard(arg)
            elif op == "flush":
                store.flush()
            elif op == "restart":
                store.close()
                store, pinned = make(d), set()
            elif op == "corrupt":
                store.flush()
                for path in Path(d).glob(f"*{HASHES[arg].hex()}*"):
                    raw = bytearray(path.read_bytes())
                    raw[-1] ^= 0xFF
                    path.write_bytes(bytes(raw))
            assert store.dram.num_bytes <= store.dram.capacity_bytes
            assert store.ssd.num_bytes <= store.ssd.capacity_bytes
            for i in pinned:
                assert store.lookup(LAYOUT, HASHES[i:i + 1]).total == 1 or store.stats.corrupt_blocks
        store.close()
        on_disk = sum(p.stat().st_size - HEADER_BYTES for p in Path(d).iterdir())
        assert on_disk == store.ssd.num_bytes


def test_a_block_being_read_is_never_evicted_under_it(tmp_path):
    store = BlockStore(DramTier(1), SsdTier(2 * len(block(11)), tmp_path))  # DRAM holds nothing: reads hit files
    put(store, 0)
    store.flush()
    reading, release = threading.Event(), threading.Event()
    real_read = store.ssd.read

    def slow_read(key):
        reading.set()
        release.wait(5)
        return real_read(key)

    store.ssd.read = slow_read
    result = []
    reader = threading.Thread(target=lambda: result.extend(store.get(LAYOUT, HASHES[:1])))
    reader.start()
    assert reading.wait(5)
    for i in range(5, 12):  # pressure that would evict block 0 from the SSD tier if it were not leased
        put(store, i)
    store.flush()
    assert store.ssd.contains((hashlib.blake2b(LAYOUT, digest_size=16).digest(), HASHES[0]))
    release.set()
    reader.join(5)
    assert [d for _, d, _ in result] == [block(0)]
    store.close()
