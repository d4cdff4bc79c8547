"""The engine's waiting queue by priority (vLLM's `--scheduling-policy priority`): lower values are admitted
first, arrival order within a priority, and a full batch admits the most urgent waiting sequence when a slot
frees."""

from kvmesh.services.engine.kv_cache import BlockAllocator
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.engine.scheduler import Scheduler
from kvmesh.services.engine.sequence import Sequence


def seq(name: str, priority: int, arrival: int) -> Sequence:
    return Sequence(name, [1, 2, 3, 4], SamplingParams(max_tokens=4, priority=priority), arrival)


def test_the_waiting_queue_admits_the_most_urgent_first_and_arrivals_in_order_within_a_priority():
    scheduler = Scheduler(BlockAllocator(64), block_size=4, max_num_batched_tokens=4, max_num_seqs=8)
    for i, (name, priority) in enumerate([("low-a", 5), ("default-a", 0), ("low-b", 5), ("urgent", -1),
                                          ("default-b", 0)]):
        scheduler.add(seq(name, priority, i))
    assert [s.request_id for s in scheduler.waiting] == ["urgent", "default-a", "default-b", "low-a", "low-b"]
    admitted = []
    while scheduler.waiting:  # a 4-token budget: one prompt per step
        step = scheduler.schedule()
        admitted += [s.request_id for s, n in step if s.num_computed_tokens == 0]
        for s, n in step:
            s.num_computed_tokens += n
    assert admitted == ["urgent", "default-a", "default-b", "low-a", "low-b"]


def test_a_full_batch_admits_the_more_urgent_late_arrival_before_earlier_less_urgent_ones():
    scheduler = Scheduler(BlockAllocator(64), block_size=4, max_num_batched_tokens=64, max_num_seqs=1)
    running = seq("running", 0, 0)
    scheduler.add(running)
    assert [s.request_id for s, _ in scheduler.schedule()] == ["running"]
    running.num_computed_tokens = 4
    scheduler.add(seq("early-low", 3, 1))
    scheduler.add(seq("late-urgent", 0, 2))
    scheduler.remove(running)
    scheduler.free_blocks(running)
    assert [s.request_id for s, _ in scheduler.schedule()] == ["late-urgent"]
