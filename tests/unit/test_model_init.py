"""`kvmesh model init` makes checkpoints that transformers loads as they are."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvmesh.services.engine.errors import InvalidRequestError
from kvmesh.services.engine.model_init import init_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "phi3", "mixtral", "qwen2_moe"])
def test_init_model_loads_in_transformers(model_dir, family):
    path = model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == family
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    ids = tokenizer("The capital of France is").input_ids
    assert tokenizer.decode(ids) == "The capital of France is"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_init_model_is_reproducible(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(init_model(tmp_path / "a", seed=7))
    b = AutoModelForCausalLM.from_pretrained(init_model(tmp_path / "b", seed=7))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_init_model_rejects_unknown_family(tmp_path):
    with pytest.raises(InvalidRequestError, match="unknown model family"):
        init_model(tmp_path, family="gpt2")
