"""Precision variants: a registry from name to a small builder.

Adding a backend is one new entry in PRECISIONS. A builder that cannot run on this
machine raises VariantUnavailable with the reason; the runner records it and goes on.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qspec import cache
from qspec.models.precisions import (  # noqa: F401
    COMPRESSED,
    FIDELITY,
    PRECISION_NAMES,
    reference_precision,
)

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class VariantUnavailable(RuntimeError):
    """This precision cannot be built here (missing backend, no CUDA, ...)."""


@dataclass
class BuildContext:
    location: str  # local dir or hub id
    device: str  # "cpu" or "cuda"
    trust_remote_code: bool = False
    calibration_texts: list[str] = field(default_factory=list)


def _load(ctx: BuildContext, **kwargs):
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("device_map", ctx.device)
    model = AutoModelForCausalLM.from_pretrained(
        ctx.location, trust_remote_code=ctx.trust_remote_code, **kwargs
    )
    return model.eval()


def _float(dtype: torch.dtype) -> Callable[[BuildContext], torch.nn.Module]:
    return lambda ctx: _load(ctx, dtype=dtype)


def _compute_dtype(ctx: BuildContext) -> torch.dtype:
    # fp16 matmuls are ~3x slower than fp32 on CPU, so compute in fp32 there.
    return torch.float16 if ctx.device == "cuda" else torch.float32


def _need_module(name: str, hint: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise VariantUnavailable(f"python package {name!r} is not installed ({hint})")


def build_int8(ctx: BuildContext):
    from transformers import BitsAndBytesConfig

    _need_module("bitsandbytes", "pip install bitsandbytes")
    quant = BitsAndBytesConfig(load_in_8bit=True)
    return _load(ctx, quantization_config=quant, dtype=_compute_dtype(ctx))


def build_int8_t0(ctx: BuildContext):
    """LLM.int8 without outlier decomposition (threshold 0): each matmul row is quantized on
    its own, where threshold 6 takes outlier columns from every row of the batch. The model
    can still fail batch invariance (measure/invariance.py measures it): rounding activations to int8
    can turn the attention's ~1e-6 shape-dependent noise into a visible jump."""
    from transformers import BitsAndBytesConfig

    _need_module("bitsandbytes", "pip install bitsandbytes")
    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    return _load(ctx, quantization_config=quant, dtype=_compute_dtype(ctx))


def _build_4bit(kind: str):
    def build(ctx: BuildContext):
        from transformers import BitsAndBytesConfig

        _need_module("bitsandbytes", "pip install bitsandbytes")
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=_compute_dtype(ctx)
        )
        return _load(ctx, quantization_config=quant, dtype=_compute_dtype(ctx))

    return build


def build_gptq_int4(ctx: BuildContext):
    """GPTQ 4-bit via gptqmodel, calibrated on suite text, cached on disk after the first build."""
    _need_module("gptqmodel", "install the extra: pip install 'qspec[gptq]'")
    _need_module("optimum", "install the extra: pip install 'qspec[gptq]'")
    from transformers import AutoTokenizer, GPTQConfig

    if not ctx.calibration_texts:
        raise VariantUnavailable("gptq-int4 needs calibration text (a suite with a corpus)")
    # gptqmodel's CPU pool defaults to half the cores: one worker on a 2-core machine
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(torch.get_num_threads()))
    # gptqmodel packs the 4-bit weights with a C++ extension it compiles on first use (31 s on
    # 2 cores, a fresh machine's every first build); its Python path packs SmolLM2-135M at once
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    out, key, group = gptq_entry(ctx)
    with cache.building(out) as missing:
        if not missing:
            cache.touch(out)
            return _load(BuildContext(str(out), ctx.device, ctx.trust_remote_code))
        tok = AutoTokenizer.from_pretrained(ctx.location, trust_remote_code=ctx.trust_remote_code)
        quant = GPTQConfig(bits=4, group_size=group, dataset=ctx.calibration_texts, tokenizer=tok)
        model = _load(ctx, quantization_config=quant, dtype=_compute_dtype(ctx))
        _drop_calibration_text(model)
        with cache.atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            source = {"model": ctx.location, "bits": 4, "group_size": group, "key": key}
            calibration = calibration_summary(ctx.calibration_texts)
            (tmp / cache.SOURCE).write_text(json.dumps({**source, "calibration": calibration}))
    cache.touch(out)
    cache.enforce_limit(keep=out)
    return model


def gptq_entry(ctx: BuildContext) -> tuple[Path, str, int]:
    """The cache folder of a GPTQ build of this model and calibration text, its key and group
    size. qspec-source.json is written last and only by atomic builds: a folder without it is
    a leftover of an interrupted in-place build (before atomic_dir) and is rebuilt."""
    group = _gptq_group_size(ctx)
    blob = json.dumps([ctx.location, 4, group, ctx.calibration_texts])
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return cache.entry_dir("gptq", key), key, group


def saved_folder(precision: str, ctx: BuildContext) -> Path | None:
    """A folder that holds this variant as saved weights (what a served engine loads), or None
    where the variant exists only in memory (bitsandbytes quantizes at load time)."""
    if precision in ("fp32", "bf16", "fp16"):
        return Path(ctx.location)
    if precision == "gptq-int4":
        out = gptq_entry(ctx)[0]
        return out if (out / "qspec-source.json").exists() else None
    if precision in COMPRESSED:
        from qspec.models.compressed_build import saved

        return saved(ctx.location, precision, ctx.calibration_texts)
    return None


def _compressed(scheme: str) -> Callable[[BuildContext], torch.nn.Module]:
    """An llm-compressor checkpoint (built once, cached), run with the scheme's numerics: its
    weights dequantized as stored, and for W8A8 / FP8 each quantized linear's input
    quantize-dequantized per token as vLLM's kernels quantize it (compressed.py)."""

    def build(ctx: BuildContext):
        from qspec.models.compressed import load_compressed
        from qspec.models.compressed_build import built_folder

        if scheme != "fp8" and not ctx.calibration_texts:
            raise VariantUnavailable(f"{scheme} needs calibration text (a suite with a corpus)")
        folder = built_folder(ctx.location, scheme, ctx.calibration_texts)
        model, info = load_compressed(folder, ctx.device, dtype=_compute_dtype(ctx))
        model.qspec_format = {**info, "builder": "llm-compressor", "folder": str(folder)}
        return model

    return build


def calibration_summary(texts: list[str]) -> dict:
    """Which calibration text a build saw, without the text: its hash and size."""
    joined = "\n\n".join(texts)
    return {
        "sha256": hashlib.sha256(joined.encode()).hexdigest(),
        "documents": len(texts),
        "characters": len(joined),
    }


def _drop_calibration_text(model) -> None:
    """GPTQConfig keeps the calibration texts as its `dataset`, which save_pretrained would
    write into config.json; the source file records their hash and size instead."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(quant, dict):
        quant["dataset"] = None
    elif quant is not None:
        quant.dataset = None


def _gptq_group_size(ctx: BuildContext) -> int:
    """128 where it divides every linear layer's input width, else the largest power of two
    below it that does: the CPU int4 kernel needs whole groups (SmolLM2-135M's 576 takes 64)."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(ctx.location, trust_remote_code=ctx.trust_remote_code)
    widths = [getattr(conf, k, 0) or 0 for k in ("hidden_size", "intermediate_size")]
    heads = getattr(conf, "num_attention_heads", 0) or 0
    head_dim = getattr(conf, "head_dim", None) or (widths[0] // heads if heads else 0)
    widths.append(heads * head_dim)  # o_proj's input
    for group in (128, 64, 32, 16):
        if all(w % group == 0 for w in widths if w):
            return group
    raise VariantUnavailable(f"no GPTQ group size divides the layer widths {widths}")


PRECISIONS: dict[str, Callable[[BuildContext], torch.nn.Module]] = {
    "fp32": _float(torch.float32),
    "bf16": _float(torch.bfloat16),
    "fp16": _float(torch.float16),
    "int8": build_int8,
    "int8-t0": build_int8_t0,
    "nf4": _build_4bit("nf4"),
    "fp4": _build_4bit("fp4"),
    "gptq-int4": build_gptq_int4,
    **{scheme: _compressed(scheme) for scheme in COMPRESSED},
}
assert tuple(PRECISIONS) == PRECISION_NAMES, "precisions.PRECISION_NAMES lists every builder"


def build(precision: str, ctx: BuildContext) -> torch.nn.Module:
    if precision not in PRECISIONS:
        raise KeyError(f"unknown precision {precision!r} (allowed: {', '.join(PRECISIONS)})")
    if precision == "fp16" and ctx.device == "cpu":
        logging.getLogger("qspec").warning(
            "fp16 on CPU is ~3x slower than fp32; timings are not representative"
        )
    model = PRECISIONS[precision](ctx)
    if precision not in AS_STORED:
        own_storage(model)
    return model


# Loaded as the checkpoint stores them: their weights may stay memory-mapped from it.
AS_STORED = ("fp32", "bf16", "fp16")


@torch.no_grad()
def own_storage(model: torch.nn.Module) -> None:
    """Copy a quantized model's unquantized tensors (embeddings, norms, biases) out of the
    source checkpoint's memory map. While one of them points into it, the whole mapping
    stays alive, and every page read while quantizing stays resident: SmolLM2-135M nf4
    held 917 MiB resident after its build, 604 MiB after this."""
    seen: set[int] = set()
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False))
        tensors += list(module.named_buffers(recurse=False))
        for _, t in tensors:
            if t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                t.data = t.data.clone()
    gc.collect()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (packed 4-bit, int8 + scales), tied ones once;
    a compressed-tensors variant counts its quantized weights as its checkpoint stores them (qspec
    runs them dequantized: compressed.py)."""
    fmt = getattr(model, "qspec_format", None)
    if fmt is not None:
        loaded = _loaded_bytes(model)
        return loaded - fmt["quantized_loaded_bytes"] + fmt["quantized_weight_bytes"]
    return _loaded_bytes(model)


def _loaded_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
        quant_state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit keeps scales here
        if quant_state is not None:
            for extra in (quant_state.absmax, getattr(quant_state, "code", None)):
                if isinstance(extra, torch.Tensor):
                    total += extra.numel() * extra.element_size()
        scb = getattr(t, "SCB", None)  # bitsandbytes int8 row scales
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total
