"""Automatic prefix caching: block accounting under any interleaving, LRU eviction only under pressure, salts
isolate tenants, a partial or still-written block is never shared, and shared prefixes give the same tokens."""

import pytest
import torch
from engine_helpers import FAMILIES, prompts_of_lengths, run_all
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.errors import OutOfBlocksError
from kvmesh.services.engine.prefix_cache import PrefixCachingAllocator
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.kv_identity import chain_salt, layout_salt, prompt_hashes

NUM_BLOCKS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


# ---- the allocator on its own ------------------------------------------------------------------------------

def test_released_blocks_stay_findable_and_are_evicted_lru_only_when_nothing_is_free():
    a = PrefixCachingAllocator(4)
    x = a.allocate(2)
    a.cache(x[0], h(0))
    a.cache(x[1], h(1))
    a.free(x)
    assert a.num_free_blocks == 4 and a.num_cached_free_blocks == 2 and a.lookup([h(0), h(1)]) == x
    y = a.allocate(2)  # the two truly free blocks first: nothing evicted
    assert set(y).isdisjoint(x) and a.num_evictions == 0 and a.lookup([h(0), h(1)]) == x
    (z,) = a.allocate(1)  # now evict: the tail (h1) before the head (h0)
    assert z == x[1] and a.num_evictions == 1 and a.lookup([h(0), h(1)]) == [x[0]]
    assert a.drain_events(10).removed == (h(1),)


def test_a_shared_block_is_freed_only_when_its_last_owner_lets_go():
    a = PrefixCachingAllocator(3)
    (b,) = a.allocate(1)
    a.cache(b, h(7))
    a.share(a.lookup([h(7)]))  # a second owner
    a.free([b])
    assert a.refcount(b) == 1 and a.num_free_blocks == 2
    with pytest.raises(OutOfBlocksError):
        a.allocate(3)  # the held block is not evictable
    a.free([b])
    assert a.refcount(b) == 0 and a.num_free_blocks == 3 and a.num_cached_free_blocks == 1


def test_a_hash_already_held_by_another_block_is_not_cached_twice():
    a = PrefixCachingAllocator(3)
    x, y = a.allocate(2)
    assert a.cache(x, h(1)) and not a.cache(y, h(1))
    a.free([x, y])
    assert a.num_cached_free_blocks == 1 and a.lookup([h(1)]) == [x]


def test_events_carry_net_changes_and_overflow_into_a_full_snapshot():
    a = PrefixCachingAllocator(2)
    x, y = a.allocate(2)
    a.cache(x, h(1))
    a.cache(y, h(2))
    events = a.drain_events(10)
    assert set(events.stored) == {h(1), h(2)} and not events.removed and not events.full
    a.free([x, y])
    a.allocate(2)  # evicts both
    events = a.drain_events(10)
    assert set(events.removed) == {h(1), h(2)} and not events.stored
    a2 = PrefixCachingAllocator(4)
    blocks = a2.allocate(4)
    for i, b in enumerate(blocks):
        a2.cache(b, h(i))
    over = a2.drain_events(3)
    assert over.full and len(over.stored) == 3  # more changes than the cap: a (capped) resync instead
    assert a2.drain_events(3) == type(over)()


alloc_ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(1, 4)),
    st.tuples(st.just("cache"), st.integers(0, 50)),
    st.tuples(st.just("share"), st.integers(0, 8)),
    st.tuples(st.just("free"), st.integers(0, 50)),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=alloc_ops)
def test_allocator_accounting_holds_under_any_interleaving(ops):
    a = PrefixCachingAllocator(8)
    owners: list[list[int]] = []  # each owner's blocks
    next_hash = 0
    for op, arg in ops:
        if op == "alloc":
            if a.can_allocate(arg):
                evictable = a.num_cached_free_blocks
                free_before = a.num_free_blocks - evictable
                evictions = a.num_evictions
                owners.append(a.allocate(arg))
                assert a.num_evictions - evictions == max(0, arg - free_before) <= evictable  # only under pressure
        elif op == "cache" and owners:
            blocks = owners[arg % len(owners)]
            a.cache(blocks[0], h(next_hash % 5))  # collisions on purpose
            next_hash += 1
        elif op == "share":
            hit = a.lookup([h(arg)])
            if hit:
                a.share(hit)
                owners.append(hit)
        elif op == "free" and owners:
            a.free(owners.pop(arg % len(owners)))
        held = {}
        for blocks in owners:
            for b in blocks:
                held[b] = held.get(b, 0) + 1
        for b in range(8):
            assert a.refcount(b) == held.get(b, 0)  # a shared block is held exactly as long as any owner holds it
            assert not (a.refcount(b) > 0 and (b in a._free or b in a._lru))
        assert len(a._free) + len(a._lru) + len(held) == 8
        assert a.num_free_blocks == 8 - len(held)
    for blocks in owners:
        a.free(blocks)
    assert a.num_free_blocks == 8 and len(a._free) + a.num_cached_free_blocks == 8


# ---- the engine --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_path(model_dir):
    return model_dir("llama")


def test_the_engine_chain_is_the_cache_services_and_the_schedulers(engine_path):
    engine = LLMEngine.from_path(engine_path, num_blocks=8, enable_prefix_caching=True)
    lay = engine.layout
    assert layout_salt(lay, "t") == chain_salt(lay.model_id, lay.dtype, lay.block_size, "t")
    ids = list(range(3, 3 + 50))
    assert engine.prefix_cache.prompt_hashes(ids, "t") == prompt_hashes(lay, ids, "t")


def test_a_second_request_shares_the_prefix_and_computes_only_the_rest(engine_path):
    engine = LLMEngine.from_path(engine_path, num_blocks=NUM_BLOCKS, enable_prefix_caching=True)
    base = prompts_of_lengths([53], seed=3)[0]
    run_all(engine, requests={"a": (base, GREEDY)})
    assert engine.prefix_cache_stats()["cached_blocks"] >= 3
    engine.add_request("b", base[:48] + [9, 9, 9], GREEDY)
    assert engine._seqs["b"].block_table == []  # a waiting request pins nothing; it shares when admitted
    engine.step()
    assert engine.step_chunks["b"] == (48, 3)  # three blocks shared, only the last three tokens computed
    outs = run_all(engine)
    assert engine.prefix_cache_stats()["hit_blocks"] == 3
    assert engine.num_free_blocks == NUM_BLOCKS
    assert outs["tokens"]["b"]


def test_the_partial_last_block_and_the_last_prompt_token_are_never_shared(engine_path):
    engine = LLMEngine.from_path(engine_path, num_blocks=NUM_BLOCKS, enable_prefix_caching=True)
    ids = prompts_of_lengths([40], seed=4)[0]
    run_all(engine, requests={"a": (ids, SamplingParams(temperature=0, max_tokens=1))})
    res = engine.reserve_prompt("b", ids)  # blocks 0, 1 full and cached; block 2 (8 tokens) partial
    assert res.num_cached_tokens == 32
    engine.release("b")
    res = engine.reserve_prompt("c", ids[:32])  # exactly two blocks: the one holding the last token is fresh
    assert res.num_cached_tokens == 16
    engine.release("c")
    assert engine.num_free_blocks == NUM_BLOCKS


def test_reserved_blocks_are_findable_only_once_their_kv_landed(engine_path):
    engine = LLMEngine.from_path(engine_path, num_blocks=NUM_BLOCKS, enable_prefix_caching=True)
    ids = prompts_of_lengths([40], seed=5)[0]
    first = engine.reserve_prompt("a", ids)
    assert first.num_cached_tokens == 0
    assert engine.reserve_prompt("b", ids).num_cached_tokens == 0  # a's blocks are still being written
    engine.release("b")
    engine.add_prefilled("a", ids, 7, GREEDY)  # landed and verified
    second = engine.reserve_prompt("c", ids)
    assert second.num_cached_tokens == 32 and second.block_ids[:2] == first.block_ids[:2]
    assert engine.allocator.refcount(first.block_ids[0]) == 2
    engine.release("c")
    run_all(engine)
    assert engine.num_free_blocks == NUM_BLOCKS


def test_cache_salts_isolate_tenants(engine_path):
    engine = LLMEngine.from_path(engine_path, num_blocks=NUM_BLOCKS, enable_prefix_caching=True)
    ids = prompts_of_lengths([40], seed=6)[0]
    engine.add_request("a", ids, SamplingParams(temperature=0, max_tokens=1), cache_salt="tenant-a")
    run_all(engine)
    assert engine.reserve_prompt("b", ids, "tenant-b").num_cached_tokens == 0
    assert engine.reserve_prompt("c", ids).num_cached_tokens == 0
    assert engine.reserve_prompt("d", ids, "tenant-a").num_cached_tokens == 32
    for rid in "bcd":
        engine.release(rid)


def test_off_by_default_and_nothing_is_kept(engine_path):
    engine = LLMEngine.from_path(engine_path, num_blocks=NUM_BLOCKS)
    ids = prompts_of_lengths([40], seed=7)[0]
    run_all(engine, requests={"a": (ids, GREEDY)})
    assert engine.reserve_prompt("b", ids).num_cached_tokens == 0
    assert engine.prefix_cache_stats()["cached_blocks"] == 0


def test_reserve_prompt_takes_nothing_when_the_fresh_blocks_do_not_fit(engine_path):
    engine = LLMEngine.from_path(engine_path, num_blocks=4, enable_prefix_caching=True)
    ids = prompts_of_lengths([40], seed=8)[0]
    run_all(engine, requests={"a": (ids, SamplingParams(temperature=0, max_tokens=1))})
    engine.reserve("hog", 16 * 2)  # two free blocks left, both of them cached-free (a's prefix)
    with pytest.raises(OutOfBlocksError):
        engine.reserve_prompt("b", ids + list(range(3, 30)))  # two shared + three fresh > two
    assert engine.num_free_blocks == 2 and engine.prefix_cache_stats()["hit_blocks"] == 0
    with pytest.raises(OutOfBlocksError):
        engine.reserve_prompt("c", ids)  # two shared + one fresh: the fresh one would have to evict a hit
    engine.release("hog")
    res = engine.reserve_prompt("c", ids)
    assert res.num_cached_tokens == 32 and engine.num_free_blocks == 1
    engine.release("c")
    assert engine.num_free_blocks == 4


engine_ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 40)),
    st.tuples(st.just("step"), st.integers(1, 4), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("reserve"), st.integers(0, 3), st.integers(1, 40)),
    st.tuples(st.just("land"), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("release"), st.integers(0, 20), st.just(0)),
), max_size=25)

BASES = [[5 + (i * 7 + k) % 50 for i in range(70)] for k in range(4)]  # prompts share these prefixes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=engine_ops)
def test_engine_blocks_all_return_and_shared_blocks_are_never_freed_early(engine_path, ops):
    engine = LLMEngine.from_path(engine_path, num_blocks=NUM_BLOCKS, max_num_batched_tokens=32,
                                 enable_prefix_caching=True)
    n = 0
    reserved: dict[str, list[int]] = {}
    for op, a, b in ops:
        rid = str(n)
        if op == "add":
            engine.add_request(rid, BASES[a][:b + 16], SamplingParams(temperature=0, max_tokens=4),
                               cache_salt=str(a % 2))
            n += 1
        elif op == "reserve":
            try:
                reserved[rid] = (BASES[a][:b + 16], engine.reserve_prompt(rid, BASES[a][:b + 16]))
            except OutOfBlocksError:
                pass
            n += 1
        elif op == "land" and str(a) in reserved:
            ids, _ = reserved.pop(str(a))
            engine.add_prefilled(str(a), ids, 9, SamplingParams(temperature=0, max_tokens=3))
        elif op == "step":
            for _ in range(a):
                engine.step()
        elif op in ("abort", "release"):
            reserved.pop(str(a), None)
            (engine.abort if op == "abort" else engine.release)(str(a))
        owners: dict[int, int] = {}
        tables = [s.block_table for s in engine._seqs.values()] + [r.block_ids for r in engine.reservations.values()]
        for table in tables:
            for blk in table:
                owners[blk] = owners.get(blk, 0) + 1
        for blk in range(NUM_BLOCKS):
            assert engine.allocator.refcount(blk) == owners.get(blk, 0)
        assert engine.num_free_blocks + len(owners) == NUM_BLOCKS
    for rid in list(reserved):
        engine.release(rid)
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        engine.step()
    assert not engine.has_unfinished()
    assert engine.num_free_blocks == NUM_BLOCKS
    stats = engine.prefix_cache_stats()
    assert len(engine.allocator._free) + stats["cached_free_blocks"] == NUM_BLOCKS


@pytest.mark.parametrize("family", FAMILIES)
def test_a_shared_prefix_gives_the_same_greedy_tokens_as_cold_and_as_hf(model_dir, hf_model, family):
    path = model_dir(family)
    base = prompts_of_lengths([70], seed=11)[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = {"warm": base[:64] + [7, 8, 9, 10, 11], "whole": base}
    cold = LLMEngine.from_path(path, num_blocks=32)
    want = run_all(cold, requests={k: (p, params) for k, p in prompts.items()})["tokens"]
    engine = LLMEngine.from_path(path, num_blocks=32, enable_prefix_caching=True)
    run_all(engine, requests={"first": (base, params)})
    got = {}
    for key, prompt in prompts.items():
        got.update(run_all(engine, requests={key: (prompt, params)})["tokens"])
        assert engine.num_free_blocks == 32
    assert engine.prefix_cache_stats()["hit_blocks"] >= 8  # 4 blocks each, shared
    assert got == want
    hf = hf_model(path)
    for key, prompt in prompts.items():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert got[key] == ref, key


def test_a_preempted_sequence_shares_its_cached_prefix_again_and_gives_the_same_tokens(model_dir):
    path = model_dir("qwen2")
    prompts = [[5 + (i * 7 + j) % 900 for j in range(20 + 9 * i)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24)

    def run(num_blocks, caching):
        engine = LLMEngine.from_path(path, num_blocks=num_blocks, enable_prefix_caching=caching)
        got = run_all(engine, requests={str(i): (p, params) for i, p in enumerate(prompts)})["tokens"]
        assert engine.num_free_blocks == num_blocks
        return got, engine.scheduler.num_preemptions, engine.prefix_cache_stats()["hit_blocks"]

    roomy, _, _ = run(64, False)
    tight, preemptions, hits = run(6, True)
    assert preemptions > 0 and hits > 0  # readmitted sequences found their own earlier blocks
    assert tight == roomy
