"""A prompt is hashed at most once per process on its way: the scheduler hashes it once and the plan carries the
hashes (and the cache probe's answer, and the local-prefill decision); decode and prefill use them instead of
hashing again, hashing only blocks they compute themselves. `kv_identity.hash_block` is the only place a block
is hashed, so counting its results counts the work."""

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

from kvmesh.services import kv_identity
from kvmesh.services.worker.engine_thread import EngineThread
from kvmesh.services.decode.worker import DecodeWorker
from kvmesh.services.decode.writeback import offer_decoded_blocks
from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.kv_identity import KVLayout, full_block_hashes, prompt_hashes
from kvmesh.services.prefill import prefix
from kvmesh.services.scheduler.cache_probe import CacheProbe
from kvmesh.services.scheduler.policies import kv_aware
from kvmesh.services.scheduler.registry import Registry, Role, WorkerSpec
from kvmesh.services.scheduler.servicer import SchedulerServicer
from kvmesh.v1 import common_pb2, decode_pb2, scheduler_pb2

PROMPT = list(range(5, 5 + 70))  # 4 full blocks of 16 and a tail: 4 reusable blocks
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture
def hashed(monkeypatch):
    """Counter of every block hash computed (by its value) while the test runs."""
    seen = Counter()
    real = kv_identity.hash_block

    def counting(prev, block):
        digest = real(prev, block)
        seen[digest] += 1
        return digest

    monkeypatch.setattr(kv_identity, "hash_block", counting)
    return seen


@pytest.fixture(scope="module")
def engine_path(model_dir):
    return model_dir("llama")


def test_the_scheduler_hashes_a_prompt_once_for_its_probe_its_index_and_the_plan(hashed):
    layout = KVLayout("tiny", "float32", 16, 2, 2, 8)
    registry = Registry(lease_s=30)
    registry.register(WorkerSpec(Role.PREFILL, "127.0.0.1:7001", layout=layout))
    decode = registry.register(WorkerSpec(Role.DECODE, "127.0.0.1:7002", layout=layout))
    registry.register(WorkerSpec(Role.CACHE, "127.0.0.1:1"))  # unreachable: the probe answers 0
    expected = prompt_hashes(layout, PROMPT)
    registry.apply_kv_events(decode.worker_id, expected[:2], [], full=True)
    hashed.clear()
    servicer = SchedulerServicer(registry, kv_aware, "kv_aware", max_queue=8, cache_probe=CacheProbe(0.05))
    request = scheduler_pb2.RouteRequest(request_id="r", prompt_token_ids=PROMPT, layout=layout.to_proto())
    reply = asyncio.run(servicer.Route(request, None))
    assert [hashed[h] for h in expected] == [1] * 4
    assert list(reply.prompt_block_hashes) == expected and reply.cache_probed
    assert reply.num_decode_cached_tokens == 32 and reply.HasField("local_prefill") and not reply.local_prefill


def test_a_decode_worker_prefilling_locally_hashes_the_prompt_at_most_once(engine_path, hashed):
    engine = LLMEngine.from_path(engine_path, num_blocks=64, enable_prefix_caching=True)
    plan_hashes = prompt_hashes(engine.layout, PROMPT)

    async def body():
        et = EngineThread(engine, asyncio.get_running_loop(), name="decode-test")
        et.start()
        worker = DecodeWorker(et, None, None, lease_s=30.0)
        try:
            for rid in ("first", "second"):  # the second finds the first's blocks in the pool
                hashed.clear()
                request = decode_pb2.DecodeRequest(
                    request_id=rid, prompt_token_ids=PROMPT, prompt_block_hashes=plan_hashes, local_prefill=True,
                    sampling=common_pb2.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
                request.prefill.address = "127.0.0.1:1"  # never dialled: the plan says prefill here
                responses = [r async for r in worker.generate(request, timeout=30)]
                assert sum(len(r.token_ids) for r in responses) == 4
                assert max(hashed[h] for h in plan_hashes) <= 1
            return responses[-1].usage.cached_tokens
        finally:
            et.stop()

    assert asyncio.run(body()) == 64  # the second request shared every reusable block


def test_a_prefilled_request_and_its_write_back_hash_the_prompt_once(engine_path, hashed):
    engine = LLMEngine.from_path(engine_path, num_blocks=64, enable_prefix_caching=True)
    plan_hashes = prompt_hashes(engine.layout, PROMPT)
    hashed.clear()
    engine.reserve_prompt("r", PROMPT, "", plan_hashes)  # the lookup uses the plan's hashes
    assert sum(hashed.values()) == 0
    engine.add_prefilled("r", PROMPT, 9, GREEDY)  # a prefill worker's KV: cached under hashes chained here
    tokens, last = list(PROMPT), None
    while engine.has_unfinished():
        for out in engine.step():  # the first output starts with the prefill worker's token
            tokens += out.new_token_ids
            last = out if out.finished else last
    offers = []
    cache = SimpleNamespace(can_offer=lambda: True, offer=lambda h, data: offers.append(h) or True)

    async def write_back():
        loop = asyncio.get_running_loop()

        def submit(fn, *args):
            done = loop.create_future()
            done.set_result(fn(*args))
            return done

        et = SimpleNamespace(engine=engine, submit=submit)
        return offer_decoded_blocks(et, cache, tokens, len(PROMPT) // 16, "", last.block_hashes[:len(PROMPT) // 16])

    assert asyncio.run(write_back())
    assert [hashed[h] for h in plan_hashes] == [1] * 4
    with_kv = (len(tokens) - 1) // 16 * 16
    assert offers == [full_block_hashes(engine.layout, tokens[:with_kv])[len(PROMPT) // 16:]]


class FakeCache:
    """The cache client as the prefill worker calls it; records lookups and offers."""

    def __init__(self):
        self.lookups, self.offers = 0, []

    async def lookup(self, hashes):
        self.lookups += 1
        return 0

    def can_offer(self):
        return True

    def offer(self, hashes, data):
        self.offers.append(hashes)
        return True


def test_a_prefill_worker_uses_the_plans_hashes_and_probe_and_hashes_only_what_it_offers(hashed):
    layout = KVLayout("tiny", "float32", 16, 2, 2, 8)
    plan_hashes = prompt_hashes(layout, PROMPT)
    cache = FakeCache()

    async def body(given, probed):
        hashed.clear()
        loop = asyncio.get_running_loop()
        et = SimpleNamespace(engine=SimpleNamespace(layout=layout), submit=lambda *a: loop.create_future())
        hashes, hashed_here = prefix.prompt_chain(cache, layout, PROMPT, "", given)
        num_cached = await prefix.import_prefix(et, cache, object(), "r", PROMPT, hashes, probed)
        known = hashes if hashed_here else hashes[:num_cached // 16]
        prefix.offer_new_blocks(et, cache, "r", PROMPT, "", num_cached, known)
        return hashes

    assert asyncio.run(body(plan_hashes, 0)) == plan_hashes
    assert cache.lookups == 0  # the scheduler's probe found nothing: no second lookup
    assert max(hashed.values()) == 1  # every block it offers hashed once, here (never a peer's hash)
    assert asyncio.run(body(plan_hashes[:2], None)) == plan_hashes  # a plan it cannot use: hashed here, once
    assert cache.lookups == 1 and max(hashed.values()) == 1
    assert cache.offers == [full_block_hashes(layout, PROMPT)] * 2
