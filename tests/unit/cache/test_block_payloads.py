"""Blocks offered to the cache round-trip through the engine's pool: export, split into Put payloads, stack back,
import."""

import numpy as np

from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.clients.cache import split_blocks


def stack_blocks(layout, blocks: list[bytes]) -> np.ndarray:
    """Block payloads back as import_blocks wants them: uint8 [L, 2, n, block_nbytes]."""
    shape = (layout.num_layers, 2, layout.block_nbytes)
    return np.stack([np.frombuffer(b, dtype=np.uint8).reshape(shape) for b in blocks], axis=2)


def test_blocks_split_and_stacked_import_into_other_blocks_unchanged(model_dir):
    engine = LLMEngine.from_path(model_dir("llama"), num_blocks=8)
    pool = engine.kv_cache.byte_view()
    pool[...] = np.random.default_rng(0).integers(0, 256, pool.shape, dtype=np.uint8)
    payloads = split_blocks(engine.kv_cache.export_blocks([1, 2, 3]))
    layout = engine.layout
    assert [len(p) for p in payloads] == [2 * layout.num_layers * layout.block_nbytes] * 3
    engine.kv_cache.import_blocks([5, 6, 7], stack_blocks(layout, payloads))
    assert np.array_equal(pool[:, :, 5:8], pool[:, :, 1:4])
    assert payloads[1] == pool[:, :, 2].tobytes()
