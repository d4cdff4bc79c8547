"""How many prompts one engine step starts (`--pack-prompt-tokens`): without the limit every waiting prompt the
token budget holds; with it, a new prompt only while the step holds fewer prompt tokens than the limit, counting
the chunk of a long prompt still prefilling, and never holding back running decodes."""

from kvmesh.services.engine.kv_cache import BlockAllocator
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.engine.scheduler import Scheduler
from kvmesh.services.engine.sequence import Sequence


def seq(name: str, num_tokens: int, arrival: int) -> Sequence:
    return Sequence(name, list(range(1, num_tokens + 1)), SamplingParams(max_tokens=8), arrival)


def scheduler(pack: int, budget: int = 64) -> Scheduler:
    s = Scheduler(BlockAllocator(64), block_size=4, max_num_batched_tokens=budget, max_num_seqs=8)
    s.pack_prompt_tokens = pack
    return s


def run(s: Scheduler) -> list[tuple[str, int]]:
    """One step: its (request id, tokens) pairs; the step's tokens then count as computed and a sequence with
    none left samples its next token (0), as the engine's step does."""
    step = s.schedule()
    for sq, n in step:
        sq.num_computed_tokens += n
        if not sq.num_uncomputed_tokens:
            sq.token_ids.append(0)
    return [(sq.request_id, n) for sq, n in step]


def test_without_a_limit_one_step_starts_every_prompt_the_budget_holds():
    s = scheduler(pack=0)
    for i in range(3):
        s.add(seq(f"p{i}", 16, i))
    assert run(s) == [("p0", 16), ("p1", 16), ("p2", 16)]


def test_a_limit_below_one_prompt_starts_one_prompt_per_step_in_arrival_order():
    s = scheduler(pack=1)
    for i in range(3):
        s.add(seq(f"p{i}", 16, i))
    assert run(s) == [("p0", 16)]
    assert run(s) == [("p0", 1), ("p1", 16)]  # p0's decode token is no prompt token: p1 starts beside it
    assert [name for name, n in run(s) if n > 1] == ["p2"]


def test_short_prompts_pack_until_the_limit_is_reached():
    s = scheduler(pack=8)
    for i in range(4):
        s.add(seq(f"p{i}", 4, i))
    assert run(s) == [("p0", 4), ("p1", 4)]  # 4 < 8 lets p1 in; 8 stops p2
    assert [name for name, n in run(s) if n > 1] == ["p2", "p3"]


def test_a_long_prompts_next_chunk_counts_against_the_limit():
    s = scheduler(pack=4, budget=16)
    s.add(seq("long", 20, 0))
    assert run(s) == [("long", 16)]
    s.add(seq("next", 8, 1))
    assert run(s) == [("long", 4)]  # its last 4 tokens reach the limit: next waits a step
    assert run(s) == [("long", 1), ("next", 8)]
    unlimited = scheduler(pack=0, budget=16)
    unlimited.add(seq("long", 20, 0))
    run(unlimited)
    unlimited.add(seq("next", 8, 1))
    assert run(unlimited) == [("long", 4), ("next", 8)]


def test_the_engine_gives_each_prompt_its_own_step_and_the_same_greedy_tokens(model_dir):
    from engine_helpers import prompts_of_lengths

    from kvmesh.services.engine.engine import LLMEngine

    prompts = prompts_of_lengths([24, 40, 32])
    results = {}
    for pack in (0, 1):
        engine = LLMEngine.from_path(model_dir("llama"), num_blocks=64)
        engine.scheduler.pack_prompt_tokens = pack
        for i, ids in enumerate(prompts):
            engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=4, temperature=0))
        first_step, tokens, step = {}, {}, 0
        while engine.has_unfinished():
            for out in engine.step():
                first_step.setdefault(out.request_id, step)
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            step += 1
        results[pack] = first_step, tokens
    assert results[0][0] == {"r0": 0, "r1": 0, "r2": 0}  # packed: one step prefills all three
    assert results[1][0] == {"r0": 0, "r1": 1, "r2": 2}  # one per step: r0's first token comes with step 0 alone
    assert results[1][1] == results[0][1]
