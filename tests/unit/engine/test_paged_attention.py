"""The tiled (paged) attention path against the gather path: the kernel on random pools and block tables, and
every family's logits through chunked prefill and batched decode with tiles forced on (the default only tiles
past GATHER_LIMIT_BYTES, which the tiny models never reach)."""

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import FAMILIES, prompts_of_lengths

from kvmesh.services.engine import gemma_attention, paged_attention
from kvmesh.services.engine import model as model_module
from kvmesh.services.engine.batch import Chunk, build_batch
from kvmesh.services.engine.kv_cache import KVCache
from kvmesh.services.engine.loader import model_class
from kvmesh.services.engine.paged_attention import attention_mode, row_slices, tiled_attention, use_tiles
from kvmesh.services.kv_identity import KVLayout

BLOCK = 16


def reference(q, k_pool, v_pool, blocks, mask, scale, softcap=None):
    """Gather each row's blocks whole and attend with explicit scores (the definition, in float64)."""
    b, lq, heads, dim = q.shape
    kv_heads = k_pool.shape[2]
    k = k_pool[blocks].reshape(b, -1, kv_heads, dim).double().repeat_interleave(heads // kv_heads, 2)
    v = v_pool[blocks].reshape(b, -1, kv_heads, dim).double().repeat_interleave(heads // kv_heads, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~F.pad(mask, (0, k.shape[1] - mask.shape[-1]))[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, lq, heads * dim)


def random_case(b, lq, heads, kv_heads, ctx_lens, window=None, seed=0, dim=8):
    """A pool of shuffled blocks, each row's table over them, and a causal (windowed) mask to each row's length."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-max(ctx_lens) // BLOCK)
    pool = b * num_blocks + 5
    k_pool, v_pool = (torch.randn(pool, BLOCK, kv_heads, dim, generator=g) for _ in range(2))
    blocks = torch.randperm(pool, generator=g)[:b * num_blocks].view(b, num_blocks)
    ctx = torch.tensor(ctx_lens)
    q_pos = ctx[:, None] - lq + torch.arange(lq)[None, :]  # [b, lq]: the last lq positions of each row
    kv_pos = torch.arange(max(ctx_lens))
    mask = kv_pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= kv_pos[None, None, :] > q_pos[:, :, None] - window
    return torch.randn(b, lq, heads, dim, generator=g), k_pool, v_pool, blocks, mask


@pytest.mark.parametrize("tile", [1, 3, None])
@pytest.mark.parametrize("b, lq, heads, kv_heads, ctx_lens, window, softcap", [
    (5, 1, 8, 2, [1, 17, 40, 33, 64], None, None),  # batched decode, GQA, lengths off the block size
    (3, 1, 4, 4, [50, 7, 81], None, None),  # multi-head attention
    (1, 9, 6, 3, [75], None, None),  # a chunked prefill: 9 queries over a 75-token context
    (4, 1, 8, 2, [90, 20, 55, 70], 16, 5.0),  # Gemma's sliding window and soft-capping
    (1, 12, 8, 4, [60], 10, 3.0),
])
def test_tiled_attention_equals_the_gathered_definition(b, lq, heads, kv_heads, ctx_lens, window, softcap, tile):
    q, k_pool, v_pool, blocks, mask = random_case(b, lq, heads, kv_heads, ctx_lens, window)
    out = tiled_attention(q, k_pool, v_pool, blocks, mask, 0.3, softcap, tile=tile)
    assert out.shape == (b, lq, heads * q.shape[-1])
    torch.testing.assert_close(out.double(), reference(q, k_pool, v_pool, blocks, mask, 0.3, softcap),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_tiled_attention_in_bfloat16_stays_within_bfloat16_rounding(softcap):
    q, k_pool, v_pool, blocks, mask = random_case(6, 1, 8, 2, [5, 33, 47, 64, 18, 50], seed=2, dim=16)
    q, k_pool, v_pool = q.bfloat16(), k_pool.bfloat16(), v_pool.bfloat16()
    out = tiled_attention(q, k_pool, v_pool, blocks, mask, 0.25, softcap, tile=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k_pool, v_pool, blocks, mask, 0.25, softcap),
                               rtol=2e-2, atol=2e-2)


def test_the_gather_limit_decides_when_a_row_reads_column_tiles(monkeypatch):
    pool = torch.zeros(8, BLOCK, 2, 4)  # 512 bytes per block
    monkeypatch.setattr(paged_attention, "GATHER_LIMIT_BYTES", 4 * 512)
    assert use_tiles("paged", pool, 5) and not use_tiles("paged", pool, 4)
    assert not use_tiles("gather", pool, 5)
    monkeypatch.setattr(paged_attention, "MAX_TILED_QUERIES", 4)
    assert use_tiles("paged", pool, 5, queries=4) and not use_tiles("paged", pool, 5, queries=5)


def test_a_decode_group_is_gathered_in_sub_batches_that_fit_a_tile(monkeypatch):
    pool = torch.zeros(8, BLOCK, 2, 4)  # 512 bytes per block
    monkeypatch.setattr(paged_attention, "TILE_BYTES", 3 * 512)
    assert row_slices("paged", pool, 7, 1) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert row_slices("paged", pool, 7, 4) == [slice(i, i + 1) for i in range(7)]  # a row over a tile: one a time
    assert row_slices("gather", pool, 7, 1) == [slice(0, 7)]


def test_attention_mode_reads_the_environment_and_refuses_unknown_modes(monkeypatch):
    assert attention_mode() == "paged"
    monkeypatch.setenv("KVMESH_ATTENTION", "gather")
    assert attention_mode() == "gather" and attention_mode("paged") == "paged"
    with pytest.raises(ValueError, match="gather, paged"):
        attention_mode("flash")


def step_logits(path, mode: str) -> list[torch.Tensor]:
    """Logits of a mixed schedule: a prompt prefilled in two chunks (the second over the cache) beside two
    whole prompts, then decode steps of all three together, lengths off the block size, tables shuffled."""
    model = model_class(path).from_path(path, "float32")
    model.attention = mode
    c = model.config
    kv = KVCache(KVLayout("t", "float32", BLOCK, c.num_layers, c.num_kv_heads, c.head_dim), 40)
    tables = [[31, 4, 17, 9, 22], [8, 35, 1, 26], [13, 6, 39]]
    seqs = prompts_of_lengths([70, 45, 37], c.vocab_size, seed=3)
    out = [model.forward(build_batch([Chunk(seqs[0][:23], 0, tables[0])], BLOCK, all_logits=True), kv)]
    step = [Chunk(seqs[0][23:60], 23, tables[0]), Chunk(seqs[1][:35], 0, tables[1]),
            Chunk(seqs[2][:30], 0, tables[2])]
    out.append(model.forward(build_batch(step, BLOCK, all_logits=True), kv))
    for j in range(7):
        step = [Chunk([seqs[0][60 + j]], 60 + j, tables[0]), Chunk([seqs[1][35 + j]], 35 + j, tables[1]),
                Chunk([seqs[2][30 + j]], 30 + j, tables[2])]
        out.append(model.forward(build_batch(step, BLOCK), kv))
    return out


@pytest.mark.parametrize("tiles", ["columns", "rows"])
@pytest.mark.parametrize("family", [*FAMILIES, "gemma2", "gemma3"])
def test_every_family_gives_the_same_logits_tiled_as_gathered(model_dir, family, tiles, monkeypatch):
    path = model_dir(family)
    gathered = step_logits(path, "gather")
    monkeypatch.setattr(paged_attention, "TILE_BYTES", 1)  # one block column per tile, one row per sub-batch
    if tiles == "columns":  # every decode row and the chunked prefill read column tiles
        monkeypatch.setattr(paged_attention, "GATHER_LIMIT_BYTES", 0)
        monkeypatch.setattr(paged_attention, "MAX_TILED_QUERIES", 64)
    calls = []  # count the paths taken, so the test cannot pass vacuously
    for module in (model_module, gemma_attention):
        monkeypatch.setattr(module, "tiled_attention",
                            lambda *a, **k: calls.append("columns") or tiled_attention(*a, **k))
        monkeypatch.setattr(module, "row_slices", lambda *a: calls.extend(["rows"] * (a[2] > 1)) or row_slices(*a))
    tiled = step_logits(path, "paged")
    assert calls.count(tiles) >= 8  # the chunked prefill or each decode step (per layer) took that path
    for a, b in zip(gathered, tiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_workers_take_the_attention_knob_from_flag_or_environment_and_refuse_others():
    from kvmesh.services.common.config import ConfigError, from_args
    from kvmesh.services.worker.config import WorkerConfig

    assert from_args(WorkerConfig, "decode", {"model": "/m"}, env={}).attention == "paged"
    assert from_args(WorkerConfig, "decode", {"model": "/m"}, env={"KVMESH_ATTENTION": "gather"}).attention == "gather"
    with pytest.raises(ConfigError, match="'flash' is not one of"):
        from_args(WorkerConfig, "decode", {"model": "/m", "attention": "flash"}, env={})
