"""`--dtype auto` follows the CPU: bfloat16 only with native bf16 instructions, float32 otherwise (features mocked)."""

import logging

import pytest

from kvmesh.services.engine import dtype_choice
from kvmesh.services.engine.dtype_choice import choose_dtype, cpu_flags, has_native_bf16, resolve_dtype
from kvmesh.services.engine.engine import LLMEngine

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_cpu_flags_reads_x86_flags_and_arm_features(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    assert has_native_bf16(cpu_flags(x86)) and has_native_bf16(cpu_flags(arm))
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("checkpoint", ["bfloat16", "float16"])
def test_auto_runs_float32_on_a_cpu_without_native_bf16(checkpoint):
    name, why = choose_dtype("auto", checkpoint, "cpu", AVX2_ONLY)
    assert name == "float32"
    assert "no native bf16" in why and checkpoint in why


@pytest.mark.parametrize("checkpoint", ["bfloat16", "float16"])
def test_auto_runs_bfloat16_on_a_cpu_with_native_bf16(checkpoint):
    assert choose_dtype("auto", checkpoint, "cpu", SAPPHIRE_RAPIDS)[0] == "bfloat16"
    assert choose_dtype("auto", checkpoint, "cpu", frozenset({"avx2", "amx_bf16"}))[0] == "bfloat16"


def test_auto_keeps_a_float32_checkpoint_and_the_checkpoints_dtype_on_cuda():
    assert choose_dtype("auto", "float32", "cpu", SAPPHIRE_RAPIDS)[0] == "float32"
    assert choose_dtype("auto", "bfloat16", "cuda", AVX2_ONLY)[0] == "bfloat16"
    assert choose_dtype("auto", "float16", "cuda:1", AVX2_ONLY)[0] == "float16"


def test_explicit_dtype_is_kept_and_bfloat16_without_native_support_says_the_cost():
    name, why = choose_dtype("bfloat16", "float32", "cpu", AVX2_ONLY)
    assert name == "bfloat16" and "slower than float32" in why
    assert "slower" not in choose_dtype("bfloat16", "float32", "cpu", SAPPHIRE_RAPIDS)[1]
    assert choose_dtype("float16", "bfloat16", "cpu", AVX2_ONLY)[0] == "float16"


def test_explicit_bfloat16_on_a_cpu_without_it_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(dtype_choice, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(dtype_choice, "_warned", set())
    with caplog.at_level(logging.INFO, logger=dtype_choice.__name__):
        for _ in range(3):
            assert resolve_dtype("bfloat16", "bfloat16", "cpu") == "bfloat16"
        assert resolve_dtype("auto", "bfloat16", "cpu") == "float32"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3-5x slower" in warnings[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and infos[0].startswith("dtype float32: auto")


@pytest.mark.parametrize("flags, expected", [(AVX2_ONLY, "float32"), (SAPPHIRE_RAPIDS, "bfloat16")])
def test_engine_with_auto_loads_a_bf16_checkpoint_per_cpu(model_dir, monkeypatch, flags, expected):
    monkeypatch.setattr(dtype_choice, "cpu_flags", lambda: flags)
    engine = LLMEngine.from_path(model_dir("llama", dtype="bfloat16"), num_blocks=4)
    assert engine.model.dtype == engine.kv_cache.pool.dtype
    assert engine.layout.dtype == expected == str(engine.model.embed.dtype).removeprefix("torch.")
