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
