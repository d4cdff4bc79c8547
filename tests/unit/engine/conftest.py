"""Helpers of the engine tests: engines over the tiny models, HF references, model variants."""

import json
import shutil

import pytest
import torch


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(path, dtype) -> a transformers model, loaded once per (path, dtype)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def load(path, dtype=torch.float32):
        key = (str(path), dtype)
        if key not in cache:
            cache[key] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        return cache[key]

    return load


@pytest.fixture(scope="session")
def variant_dir(model_dir, tmp_path_factory):
    """variant_dir(family, name, **config_overrides) -> a copy of the tiny model with config.json edited."""
    made = {}

    def make(family: str, name: str, **overrides):
        if name not in made:
            dst = tmp_path_factory.mktemp(f"{family}-{name}")
            shutil.copytree(model_dir(family), dst, dirs_exist_ok=True)
            config = json.loads((dst / "config.json").read_text())
            config.update(overrides)
            (dst / "config.json").write_text(json.dumps(config))
            made[name] = dst
        return made[name]

    return make
