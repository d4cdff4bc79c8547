"""`kvmesh model init`: small checkpoints of every family the engine runs, with random weights, made on this machine.

No model hub is reachable here, so tests and benchmarks use models that kvmesh makes itself: a config of a
real family, random weights from a fixed seed, and a real byte-level BPE tokenizer with a chat template,
saved in the ordinary HF layout so the engine loads them through the same code as any checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvmesh.services.engine.errors import InvalidRequestError

FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "phi3", "mixtral", "qwen2_moe", "gemma2", "gemma3")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """The shape of a generated model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int


PRESETS = {
    # about 1 M parameters: the models every test runs on
    "tiny": Preset(1024, 128, 384, 4, 4, 2, 1024),
    # 3 KV heads (6 query heads): the model that splits over 3 tensor-parallel ranks
    "tiny-kv3": Preset(1024, 192, 384, 2, 6, 3, 1024),
    # about 30 M parameters, 8 layers: the benchmarks' stand-in for a real model
    "small": Preset(4096, 512, 1536, 8, 8, 4, 4096),
}

# Random weights drawn with the HF default (std 0.02) give logits so flat that greedy argmax is decided by
# rounding noise; a wider init keeps the top token clear of the runner-up, so parity tests are meaningful.
INIT_STD = 0.08


def _corpus() -> list[str]:
    """Deterministic training text for the tokenizer: English prose, code and digits."""
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this
    zen = codecs.decode(this.s, "rot13")
    prose = (
        "The capital of France is Paris. The capital of Italy is Rome. A key value cache stores the keys and "
        "values of every token that attention has seen, so that decoding the next token costs one step. "
        "Prefill computes the whole prompt at once; decode produces one token at a time. "
        "Hello, world! How are you today? I am a language model, and I answer questions. "
        "def main():\n    print('hello')\n    return 0\n"
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 2026 3.14159 "
        "user assistant system Tell me a story about a cat who lived in a lighthouse by the sea. "
    )
    return [zen, prose] * 4


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the built-in corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(family: str, preset: Preset, tokenizer, dtype: str = "float32"):
    """An HF config of `family` with the preset's shape."""
    if family not in FAMILIES:
        raise InvalidRequestError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype=dtype,
    )
    if family.startswith("gemma"):
        from kvmesh.services.engine.gemma import tiny_hf_config

        return tiny_hf_config(family, common)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False)
    if family == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None)
    return _newer_family_config(family, preset, common)


def _newer_family_config(family: str, preset: Preset, common: dict):
    """Qwen3 (q/k norms, an explicit head_dim twice hidden/heads), Phi-3 (fused projections) and the mixtures
    of experts: 4 experts, top 2, each half the dense intermediate size, so a token's active MLP equals the
    dense families' of the same preset."""
    from transformers import MixtralConfig, Phi3Config, Qwen2MoeConfig, Qwen3Config

    if family == "qwen3":
        head_dim = 2 * preset.hidden_size // preset.num_attention_heads
        return Qwen3Config(**common, head_dim=head_dim, tie_word_embeddings=True, rope_theta=1000000.0,
                           use_sliding_window=False)
    if family == "phi3":
        return Phi3Config(**common, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None)
    experts = {"num_experts_per_tok": 2, "tie_word_embeddings": False, "rope_theta": 1000000.0}
    if family == "mixtral":
        return MixtralConfig(**{**common, "intermediate_size": preset.intermediate_size // 2}, **experts,
                             num_local_experts=4, sliding_window=None)
    return Qwen2MoeConfig(**common, **experts, num_experts=4, moe_intermediate_size=preset.intermediate_size // 4,
                          shared_expert_intermediate_size=preset.intermediate_size // 2, norm_topk_prob=False,
                          use_sliding_window=False)


def init_model(path: str | Path, preset: str = "tiny", family: str = "llama", seed: int = 0,
               dtype: str = "float32") -> Path:
    """Make a random-weight model of `family` and `preset` at `path`; return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    if preset not in PRESETS:
        raise InvalidRequestError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    path = Path(path)
    tokenizer = build_tokenizer(PRESETS[preset].vocab_size)
    config = build_config(family, PRESETS[preset], tokenizer, dtype)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if family.startswith("gemma"):
        from kvmesh.services.engine.gemma import perturb_norms

        perturb_norms(model, INIT_STD)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    meta = {"kvmesh_model_init": {"preset": preset, "family": family, "seed": seed}}
    (path / "kvmesh.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path
