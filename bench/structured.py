"""Structured output: outlines-core vs xgrammar on this CPU, at a real model's vocabulary (issue #16).

For each library available in the running interpreter: the time to prepare the vocabulary once, the time to
compile each schema of a small set, and the per-token overhead of constrained decoding — fill the allowed-token
mask for the current state, apply it to a row of logits, pick the best allowed token, advance the state — against
the baseline of the same step without a constraint (argmax of the row), measured in the same run. The walk follows
the masked argmax of random logits (what greedy decoding under the constraint does), restarting at the end of a
document, so the states visited are the ones decoding visits.

    python bench/structured.py --tokenizer ~/.cache/kvmesh/models/SmolLM2-135M-Instruct --out bench/structured.json

Both libraries need not be installed together: the run reports whichever import (xgrammar pulls triton, about
1 GB, on Linux x86-64; outlines-core has no runtime dependency). Run it in a scratch venv holding both.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import torch

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"]},
    "nested": {"type": "object", "required": ["id", "tags", "owner"], "properties": {
        "id": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "owner": {"type": "object", "required": ["email", "active"], "properties": {
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}, "active": {"type": "boolean"}}}}},
    "wide": {"type": "object", "required": [f"f{i}" for i in range(12)],
             "properties": {f"f{i}": {"type": ["string", "number", "boolean"][i % 3]} for i in range(12)}},
}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to chars from 256 on."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _token_bytes(token: str, byte_level: bool) -> bytes | None:
    if byte_level:
        table = _unicode_to_byte()
        return bytes(table[ch] for ch in token) if all(ch in table for ch in token) else None
    fallback = _BYTE_FALLBACK.match(token)
    return bytes([int(fallback.group(1), 16)]) if fallback else token.replace("\u2581", " ").encode()


def byte_vocab(tokenizer) -> dict[bytes, list[int]]:
    """What outlines-core's Vocabulary takes: token bytes -> ids, special and added tokens left out (xgrammar reads
    the tokenizer itself). Byte-level BPE (GPT-2's alphabet) or SentencePiece (`▁`, `<0xNN>` byte fallback)."""
    skip = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_level = any(t and "\u0120" in t for t in tokens)
    vocab: dict[bytes, list[int]] = {}
    for token_id, token in enumerate(tokens):
        data = None if token is None or token_id in skip else _token_bytes(token, byte_level)
        if data:
            vocab.setdefault(data, []).append(token_id)
    return vocab


class Outlines:
    name = "outlines-core"

    def __init__(self, tokenizer, eos: int):
        from outlines_core import Vocabulary
        self.vocab = Vocabulary(eos, byte_vocab(tokenizer))

    def compile(self, schema: dict):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema
        return Index(build_regex_from_schema(json.dumps(schema)), self.vocab)

    def matcher(self, compiled):
        from outlines_core import Guide
        return Guide(compiled)

    def fill(self, guide, bitmask: torch.Tensor) -> None:
        guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())

    def advance(self, guide, token: int) -> bool:
        guide.advance(token, return_tokens=False)
        return guide.is_finished()

    def accepts(self, schema: dict, text: str) -> bool:
        from outlines_core.json_schema import build_regex_from_schema
        return re.fullmatch(build_regex_from_schema(json.dumps(schema)), text) is not None


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, eos: int):
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask)

    def advance(self, matcher, token: int) -> bool:
        matcher.accept_token(token)
        return matcher.is_terminated()

    def accepts(self, schema: dict, text: str) -> bool:
        matcher = self.xgr.GrammarMatcher(self.compile(schema))
        return matcher.accept_string(text) and matcher.is_completed()


_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # byte -> its 8 bits, least significant first


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """A [1, ceil(vocab/32)] int32 bitmask (both libraries' layout) as a [vocab] bool mask: one table lookup per
    byte, the same kernel for both, so the difference between them is the library's own work."""
    return _BITS[bitmask[0].view(torch.uint8).long()].reshape(-1)[:vocab]


def walk(lib, compiled, vocab: int, eos: int, steps: int) -> dict:
    """µs per constrained step, of them in the library (fill + advance; the slowest fill), and per unconstrained
    step (argmax only), over `steps` tokens of masked greedy decoding."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(steps, vocab, generator=gen)
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    start = time.perf_counter()
    for i in range(steps):
        int(rows[i].argmax())
    base = time.perf_counter() - start
    m = lib.matcher(compiled)
    in_lib, worst = 0.0, 0.0
    start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        lib.fill(m, bitmask)
        worst = max(worst, time.perf_counter() - t0)
        in_lib += time.perf_counter() - t0
        row = rows[i].masked_fill(~unpack(bitmask, vocab), float("-inf"))
        token = int(row.argmax())
        if token == eos:
            m = lib.matcher(compiled)
            continue
        t0 = time.perf_counter()
        lib.advance(m, token)
        in_lib += time.perf_counter() - t0
    total = time.perf_counter() - start
    return {"step_us": total / steps * 1e6, "library_us": in_lib / steps * 1e6, "worst_fill_us": worst * 1e6,
            "baseline_us": base / steps * 1e6, "overhead_us": (total - base) / steps * 1e6}


def measure(lib_cls, tokenizer, eos: int, steps: int) -> dict:
    start = time.perf_counter()
    lib = lib_cls(tokenizer, eos)
    out = {"library": lib.name, "vocab_setup_s": time.perf_counter() - start, "schemas": {}}
    ranged = {"type": "integer", "minimum": 1, "maximum": 5}
    out["honours_ranges"] = lib.accepts(ranged, "3") and not lib.accepts(ranged, "99")
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        compiled = lib.compile(schema)
        out["schemas"][name] = {"compile_s": time.perf_counter() - start,
                                **walk(lib, compiled, len(tokenizer), eos, steps)}
    return out


def engine_tpot(model: str, tokens: int, rounds: int = 3) -> dict:
    """The engine's median time per output token (ms) on a real model, greedy, batch of one, with and without a
    constraint that cannot end before max_tokens (xgrammar through the engine's own mask kernel); the two
    alternate `rounds` times, so a load that comes and goes on shared cores hits both alike."""
    from kvmesh.services.engine.engine import LLMEngine
    from kvmesh.services.engine.sampler import SamplingParams
    from kvmesh.services.engine.structured import Constraint

    engine = LLMEngine.from_path(str(Path(model).expanduser()), num_blocks=64)
    prompt = engine.tokenizer.encode("Describe the weather in one long sentence:")
    constraint = Constraint("regex", "[a-z ]{2000}")
    engine.grammars.compile(constraint)  # as the workers do, before the engine sees it
    times: dict[str, list[float]] = {"unconstrained": [], "regex [a-z ]{2000}": []}
    for i in range(rounds * 2):
        name = list(times)[i % 2]
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                                structured=constraint if i % 2 else None)
        engine.add_request(f"{name}-{i}", prompt, params)
        engine.step()  # the prompt
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()} | {"all": times}


def cpu_flags() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "")
    return f"{model}; " + " ".join(f for f in wanted if f in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a model folder holding tokenizer.json")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="bench/structured.json")
    parser.add_argument("--engine", default="", help="a model folder: also time the engine's decode with and "
                        "without a constraint (needs kvmesh's venv with xgrammar)")
    parser.add_argument("--engine-tokens", type=int, default=48)
    args = parser.parse_args()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(Path(args.tokenizer).expanduser()))
    torch.set_num_threads(1)
    results = {"cpu": cpu_flags(), "python": platform.python_version(), "vocab": len(tokenizer), "runs": []}
    for lib_cls in (Outlines, XGrammar):
        try:
            results["runs"].append(measure(lib_cls, tokenizer, tokenizer.eos_token_id, args.steps))
        except ImportError as exc:
            print(f"{lib_cls.name}: not installed ({exc})")
    if args.engine:
        results["engine_tpot_ms"] = engine_tpot(args.engine, args.engine_tokens)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{results['cpu']}; vocabulary {results['vocab']}")
    for run in results["runs"]:
        print(f"{run['library']}: vocabulary setup {run['vocab_setup_s']:.2f} s, "
              f"honours integer ranges: {run['honours_ranges']}")
        for name, r in run["schemas"].items():
            print(f"  {name:7s} compile {r['compile_s'] * 1e3:8.1f} ms  step {r['step_us']:7.1f} µs  "
                  f"(library {r['library_us']:6.1f}, slowest fill {r['worst_fill_us']:6.1f})  "
                  f"baseline {r['baseline_us']:6.1f} µs  overhead {r['overhead_us']:7.1f} µs/token")
    for name, ms in results.get("engine_tpot_ms", {}).items():
        if name != "all":
            print(f"engine decode, {name}: median {ms:.2f} ms per token")


if __name__ == "__main__":
    main()
