"""Plain helpers shared by the engine tests."""

import os

import torch

MOE_FAMILIES = ["mixtral", "qwen2_moe"]
NEW_FAMILIES = ["qwen3", "phi3", *MOE_FAMILIES]
FAMILIES = ["llama", "qwen2", "mistral", *NEW_FAMILIES]


def device_under_test() -> str:
    """The torch device the engine parity tests run our engine on: KVMESH_TEST_DEVICE (cpu, cuda, cuda:1, ...),
    cpu by default; HF's reference stays on the CPU. A device asked for and missing is an error, never a skip."""
    device = os.environ.get("KVMESH_TEST_DEVICE", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"KVMESH_TEST_DEVICE={device}, but torch {torch.__version__} sees no CUDA device")
    return device


def run_all(engine, start_step: dict | None = None, requests: dict | None = None) -> dict:
    """Step `engine` until idle, adding requests[rid] = (ids, params) at step start_step[rid]; rid -> tokens."""
    requests = requests or {}
    start_step = start_step or {}
    tokens: dict = {}
    reasons: dict = {}
    step = 0
    while engine.has_unfinished() or any(start_step.get(r, 0) >= step for r in requests):
        for rid, (ids, params) in requests.items():
            if start_step.get(rid, 0) == step:
                engine.add_request(rid, ids, params)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        step += 1
        assert step < 10_000, "engine never went idle"
    return {"tokens": tokens, "reasons": reasons}


def prompts_of_lengths(lengths, vocab_size=1024, seed=0):
    """Deterministic random prompts (avoiding the special tokens 0-2)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]
