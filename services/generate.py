"""`kvmesh generate`: offline generation in one process; every prompt joins one continuous batch."""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF checkpoint folder")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split the model over N processes (torch.distributed: gloo on CPU, NCCL on CUDA)")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt, in order")


def generate(engine, prompts: list[str], params) -> list[dict]:
    """Run `prompts` as one batch to completion; one result dict per prompt, in order."""
    ids = [engine.tokenizer(p).input_ids for p in prompts]
    for prompt_ids in ids:  # all or nothing: refuse before any prompt starts
        engine.validate(prompt_ids, params)
    for i, prompt_ids in enumerate(ids):
        engine.add_request(str(i), prompt_ids, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    reasons: dict[str, str | None] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return [
        {
            "prompt": prompt,
            "prompt_token_ids": ids[i],
            "token_ids": tokens[str(i)],
            "text": engine.tokenizer.decode(tokens[str(i)], skip_special_tokens=True),
            "finish_reason": reasons.get(str(i)),
        }
        for i, prompt in enumerate(prompts)
    ]


def run(args: argparse.Namespace) -> int:
    import torch

    from kvmesh.services.engine.engine import LLMEngine
    from kvmesh.services.engine.errors import EngineError
    from kvmesh.services.engine.sampler import SamplingParams

    threads = os.environ.get("KVMESH_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    engine = None
    try:
        engine = LLMEngine.from_path(args.model, dtype=args.dtype, max_num_seqs=max(len(args.prompt), 1),
                                     tensor_parallel_size=args.tensor_parallel_size)
        results = generate(engine, args.prompt, params)
    except EngineError as e:
        raise SystemExit(f"kvmesh generate: {e}") from None
    finally:
        if engine is not None:
            engine.model.close()
    for r in results:
        print(json.dumps(r) if args.json else r["text"])
    return 0
