"""Spill and page back (swap.py): victims, the swapped queue, page-back order, and greedy tokens unchanged."""

import numpy as np

from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.kv_cache import BlockAllocator
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.engine.scheduler import Scheduler
from kvmesh.services.engine.sequence import Sequence, SequenceStatus
from kvmesh.services.engine.swap import PageIn, SpillOut, Swap

BS = 4


class Store:
    """A stand-in for the cache service: keeps spilled blocks by (request, position), pages them back on demand."""

    def __init__(self, lose: bool = False):
        self.blocks: dict = {}
        self.page_ins: list[PageIn] = []
        self.lose = lose

    def emit(self, event) -> None:
        if isinstance(event, SpillOut):
            for j, pos in enumerate(event.positions):
                self.blocks[(event.request_id, pos)] = event.data[:, :, j:j + 1].copy()
        else:
            self.page_ins.append(event)

    def deliver(self, engine) -> None:
        """Between steps, as the decode worker's page-back task does: the KV into the blocks, then paged_back."""
        for event in self.page_ins:
            ok = not self.lose and all((event.request_id, p) in self.blocks for p in event.positions)
            if ok:
                data = np.concatenate([self.blocks.pop((event.request_id, p)) for p in event.positions], axis=2)
                engine.kv_cache.import_blocks(list(event.block_ids), data)
            engine.paged_back(event.request_id, ok)
        self.page_ins.clear()


def _scheduler(num_blocks: int, store: Store) -> Scheduler:
    scheduler = Scheduler(BlockAllocator(num_blocks), BS, 64, 8)
    scheduler.swap = Swap(lambda ids: np.zeros((1, 2, len(ids), 8), np.uint8), store.emit, BS)
    return scheduler


def _running(scheduler: Scheduler, rid: str, num_tokens: int, arrival: int) -> Sequence:
    """A decoding sequence whose `num_tokens` tokens all have KV but the last (as after a step)."""
    seq = Sequence(rid, list(range(3, 3 + num_tokens)), SamplingParams(temperature=0, max_tokens=64), arrival)
    seq.num_computed_tokens = num_tokens - 1
    seq.block_table = scheduler.allocator.allocate(-(-(num_tokens - 1) // BS))
    scheduler.add_running(seq)
    return seq


def test_the_latest_arrival_gives_up_its_oldest_blocks_and_keeps_its_last():
    store = Store()
    scheduler = _scheduler(8, store)
    _running(scheduler, "a", 17, 0)  # 4 full blocks: its next token needs a 5th
    b = _running(scheduler, "b", 14, 1)  # 4 blocks, its next token fits in its last one; none free
    last_of_b = b.block_table[-1]
    scheduled = scheduler.schedule()
    assert [s.request_id for s, _ in scheduled] == ["a"]
    assert b.status is SequenceStatus.SPILLED and scheduler.num_swapped == 1
    assert b.spilled == [0] and b.block_table[0] == -1 and b.block_table[-1] == last_of_b  # oldest first, one
    assert scheduler.num_preemptions == 0 and scheduler.swap.num_spilled_blocks == 1
    assert not store.page_ins  # no free block to page back into yet


def _swapped(scheduler: Scheduler, rid: str, num_tokens: int, arrival: int, positions: list[int]) -> Sequence:
    """A sequence that spilled the blocks at `positions` earlier."""
    seq = _running(scheduler, rid, num_tokens, arrival)
    scheduler.running.remove(seq)
    scheduler.allocator.free([seq.block_table[i] for i in positions])
    for i in positions:
        seq.block_table[i] = -1
    seq.spilled, seq.status = list(positions), SequenceStatus.SPILLED
    scheduler.swap.swapped.append(seq)
    return seq


def test_with_nothing_running_the_others_give_up_even_their_last_blocks_for_the_oldest():
    store = Store()
    scheduler = _scheduler(7, store)
    a = _swapped(scheduler, "a", 17, 0, [0, 1, 2])  # holds its last block, needs 3 back
    b = _swapped(scheduler, "b", 21, 1, [0])  # holds 4: only 2 free
    assert scheduler.swap.has_work(scheduler)
    scheduler.schedule()
    assert b.block_table == [-1] * 5 and b.spilled == [0, 1, 2, 3, 4]  # b's last block went too
    assert [(e.request_id, e.positions) for e in store.page_ins] == [("a", (0, 1, 2))]
    assert a.status is SequenceStatus.PAGING_BACK and scheduler.num_preemptions == 0


def test_swapped_sequences_page_back_in_arrival_order_before_any_waiting_one():
    store = Store()
    scheduler = _scheduler(12, store)
    seqs = [_running(scheduler, str(i), 13, i) for i in range(3)]  # 3 blocks each, 3 free
    assert scheduler.swap.spill(scheduler, seqs[0], 2) is seqs[2]  # the newest first
    assert scheduler.swap.spill(scheduler, seqs[0], 2) is seqs[1]  # seqs[2] has nothing left to give
    waiting = Sequence("w", [5] * 9, SamplingParams(temperature=0, max_tokens=4), 9)
    scheduler.add(waiting)
    scheduler.schedule()
    assert [e.request_id for e in store.page_ins] == ["1"]  # the oldest swapped one, one at a time
    assert waiting.status is SequenceStatus.WAITING and not waiting.block_table  # swapped ones come first
    scheduler.swap.paged_back(scheduler, seqs[1], True)
    scheduler.schedule()
    assert [e.request_id for e in store.page_ins] == ["1", "2"]
    assert seqs[1].status is SequenceStatus.RUNNING and -1 not in seqs[1].block_table


def test_a_failed_page_back_recomputes_from_the_tokens():
    store = Store()
    scheduler = _scheduler(12, store)
    a, b = _running(scheduler, "a", 13, 0), _running(scheduler, "b", 13, 1)
    assert scheduler.swap.spill(scheduler, a, 2) is b
    scheduler.schedule()
    assert store.page_ins and b.status is SequenceStatus.PAGING_BACK
    scheduler.swap.paged_back(scheduler, b, False)
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    assert scheduler.swap.num_page_back_failures == 1 and scheduler.num_preemptions == 0


def _generate(path, num_blocks: int, store: Store | None, abort_after: int | None = None):
    engine = LLMEngine.from_path(path, num_blocks=num_blocks, block_size=BS)
    if store is not None:
        engine.enable_spill(store.emit)
    params = SamplingParams(temperature=0, max_tokens=24)
    for i in range(4):
        engine.add_request(str(i), [5 + (i * 7 + j) % 900 for j in range(20 + 5 * i)], params)
    tokens, steps = {}, 0
    while engine.has_unfinished() or (store is not None and store.page_ins):
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
        if abort_after is not None and steps == abort_after:
            for rid in list(engine._seqs):
                engine.abort(rid)
        if store is not None:
            store.deliver(engine)
    assert engine.num_free_blocks == num_blocks
    assert all(engine.allocator.refcount(b) == 0 for b in range(num_blocks))
    return tokens, engine.scheduler


def test_spilled_sequences_give_the_same_greedy_tokens_without_preemption(model_dir):
    path = model_dir("qwen2")
    roomy, _ = _generate(path, 64, None)
    store = Store()
    tight, scheduler = _generate(path, 20, store)
    assert tight == roomy
    assert scheduler.num_preemptions == 0
    assert scheduler.swap.num_spilled_blocks > 0 and scheduler.swap.num_paged_back_blocks > 0
    assert not store.blocks  # every spilled block came back


def test_lost_spilled_blocks_are_recomputed_with_the_same_tokens(model_dir):
    path = model_dir("qwen2")
    roomy, _ = _generate(path, 64, None)
    tight, scheduler = _generate(path, 20, Store(lose=True))
    assert tight == roomy and scheduler.swap.num_page_back_failures > 0


def test_aborting_swapped_sequences_frees_every_block(model_dir):
    store = Store()
    _, scheduler = _generate(model_dir("qwen2"), 20, store, abort_after=30)
    assert scheduler.swap.num_spilled_blocks > 0 and scheduler.num_swapped == 0


def test_a_sequence_this_step_already_runs_is_never_a_victim():
    store = Store()
    scheduler = _scheduler(5, store)
    old = _running(scheduler, "old", 14, 0)  # 4 blocks, its next token fits: scheduled first
    new = _running(scheduler, "new", 5, 1)  # 1 block, its next token needs a 2nd, and it has nothing to spill
    scheduled = scheduler.schedule()
    assert [s.request_id for s, _ in scheduled] == ["old"]
    assert old.status is SequenceStatus.RUNNING and -1 not in old.block_table  # its blocks stay: it runs now
    assert new.status is SequenceStatus.WAITING and scheduler.num_preemptions == 1  # the old way, as a last resort


def test_a_waiting_sequence_holding_reserved_blocks_is_admitted_while_others_are_swapped():
    store = Store()
    scheduler = _scheduler(8, store)
    _swapped(scheduler, "out", 17, 0, [0, 1, 2])  # needs 3 back
    held = Sequence("held", [5] * 9, SamplingParams(temperature=0, max_tokens=4), 1)
    held.block_table = scheduler.allocator.allocate(3)  # a reservation of a prompt prefilled here
    scheduler.add(held)
    fresh = Sequence("fresh", [6] * 5, SamplingParams(temperature=0, max_tokens=4), 2)
    scheduler.add(fresh)
    scheduled = scheduler.schedule()
    assert [s.request_id for s, _ in scheduled] == ["held"]  # its blocks are taken: idle, they would help no one
    assert [e.request_id for e in store.page_ins] == ["out"]
    assert fresh.status is SequenceStatus.WAITING and not fresh.block_table  # a new one waits for the swapped
