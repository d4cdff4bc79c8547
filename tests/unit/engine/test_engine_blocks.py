"""Block accounting holds under any interleaving of add, step, abort and preemption."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.sampler import SamplingParams

NUM_BLOCKS = 10

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 60), st.integers(1, 40)),
        st.tuples(st.just("step"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 20), st.just(0)),
        st.tuples(st.just("prefill_only"), st.integers(1, 40), st.just(0)),
        st.tuples(st.just("release"), st.integers(0, 20), st.just(0)),
    ),
    max_size=25,
)


@pytest.fixture(scope="module")
def engine_path(model_dir):
    return model_dir("llama")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_blocks_all_return_whatever_happens(engine_path, ops):
    # 10 blocks of 16 tokens and requests up to 100 tokens: preemption happens often
    engine = LLMEngine.from_path(engine_path, num_blocks=NUM_BLOCKS, max_num_batched_tokens=32)
    n = 0
    prefilled = set()  # prefill-only requests hold their blocks until released
    for op, a, b in ops:
        if op == "add":
            engine.add_request(str(n), [5 + (i % 50) for i in range(a)], SamplingParams(temperature=0, max_tokens=b))
            n += 1
        elif op == "prefill_only":
            engine.add_request(str(n), [7] * a, SamplingParams(temperature=0, max_tokens=1), prefill_only=True)
            n += 1
        elif op == "step":
            for _ in range(a):
                prefilled.update(o.request_id for o in engine.step() if o.finish_reason == "prefill")
        elif op == "abort":
            engine.abort(str(a))
        else:
            engine.release(str(a))
        assert all(engine.allocator.refcount(b) >= 0 for b in range(NUM_BLOCKS))
        held = sum(len(s.block_table) for s in engine._seqs.values())
        assert engine.num_free_blocks + held == NUM_BLOCKS
    for rid in prefilled:
        engine.release(rid)
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finish_reason == "prefill":
                engine.release(out.request_id)
    assert not engine.has_unfinished()
    for i in range(n):
        engine.release(str(i))
    assert engine.num_free_blocks == NUM_BLOCKS
    assert all(engine.allocator.refcount(b) == 0 for b in range(NUM_BLOCKS))


def test_preemption_recomputes_and_gives_the_same_tokens(model_dir):
    path = model_dir("qwen2")
    prompts = [[5 + (i * 7 + j) % 900 for j in range(20 + 9 * i)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24)

    def run(num_blocks):
        engine = LLMEngine.from_path(path, num_blocks=num_blocks)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        tokens = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert engine.num_free_blocks == num_blocks
        return tokens, engine.scheduler.num_preemptions

    roomy, none = run(64)
    tight, some = run(6)
    assert none == 0 and some > 0
    assert tight == roomy


def test_abort_is_idempotent_and_reported_once(model_dir):
    engine = LLMEngine.from_path(model_dir("llama"), num_blocks=8)
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=30))
    engine.step()
    engine.abort("a")
    engine.abort("a")
    engine.abort("never-seen")
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("a", True, "abort")]
    assert engine.num_free_blocks == 8 and not engine.has_unfinished()
