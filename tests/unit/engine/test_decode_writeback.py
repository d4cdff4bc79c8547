"""The decode worker's write-back of a finished request's KV (`--cache-decode-kv`), against a real engine: the
blocks offered are those past the ones already offered, copied by hash from the pool, byte for byte; a block
evicted before the copy is not offered, nor anything after it; without a cache nothing is queued."""

import asyncio

import numpy as np
from engine_helpers import prompts_of_lengths, run_all

from kvmesh.services.decode.writeback import offer_decoded_blocks
from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.kv_identity import full_block_hashes

NUM_BLOCKS = 12


class InlineEngineThread:
    """EngineThread's submit, run at once (these tests are the engine thread)."""

    def __init__(self, engine):
        self.engine = engine

    def submit(self, fn, *args):
        future = asyncio.get_running_loop().create_future()
        future.set_result(fn(*args))
        return future


class RecordingCache:
    def __init__(self):
        self.offers = []

    def can_offer(self) -> bool:
        return True

    def offer(self, hashes, data) -> bool:
        self.offers.append((hashes, data))
        return True


def finished(engine, prompt, max_tokens):
    out = run_all(engine, requests={"a": (prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                 ignore_eos=True))})
    return prompt + out["tokens"]["a"]


def offered(engine, token_ids, first_block, cache):
    async def body():
        queued = offer_decoded_blocks(InlineEngineThread(engine), cache, token_ids, first_block, "")
        if not queued:
            return None
        hashes, data = cache.offers[-1]
        return hashes, await data

    return asyncio.run(body())


def test_the_reply_blocks_are_offered_by_hash_byte_for_byte(model_dir):
    engine = LLMEngine.from_path(model_dir("llama"), num_blocks=NUM_BLOCKS, enable_prefix_caching=True)
    prompt = prompts_of_lengths([37], seed=5)[0]  # 2 full blocks and 5 tokens
    tokens = finished(engine, prompt, 40)  # 77 tokens, 76 with KV: 4 full blocks
    cache = RecordingCache()
    hashes, data = offered(engine, tokens, 2, cache)
    chain = full_block_hashes(engine.layout, tokens[:64])
    assert hashes == chain[2:4]
    held = engine.lookup_blocks(chain)
    assert len(held) == 4 and data.shape[2] == 2
    assert np.array_equal(data, engine.export_blocks(held[2:4]))
    assert offered(engine, tokens, 4, cache) is None  # nothing past the blocks already offered
    assert offered(engine, tokens, 0, None) is None  # no cache, nothing queued


def test_a_block_evicted_before_the_copy_ends_the_offer_there(model_dir):
    engine = LLMEngine.from_path(model_dir("llama"), num_blocks=NUM_BLOCKS, enable_prefix_caching=True)
    prompt = prompts_of_lengths([37], seed=6)[0]
    tokens = finished(engine, prompt, 40)
    chain = full_block_hashes(engine.layout, tokens[:64])
    held = engine.lookup_blocks(chain)
    engine.allocator.allocate(NUM_BLOCKS - 4 + 1)  # every free block, then the LRU tail: the reply's last block
    assert engine.lookup_blocks(chain) == held[:3]
    hashes, data = offered(engine, tokens, 2, RecordingCache())
    assert data.shape[2] == 1  # the put pairs the leading hashes with the blocks that came: block 2 alone
    assert np.array_equal(data, engine.export_blocks(held[2:3]))
    assert hashes[0] == chain[2]
