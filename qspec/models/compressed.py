"""Load a compressed-tensors checkpoint (llm-compressor's W8A8, FP8 dynamic, W4A16) into a plain
transformers model that qspec's loop runs, with the numerics vLLM computes for it.

Why not transformers' own loader: it needs the compressed-tensors package (absent from qspec's
venv), and the activation quantization it simulates is compressed-tensors' (int8 scale =
max|x| / 127.5), not vLLM's (max|x| / 127). So this reads the safetensors itself: every quantized
linear gets its weight dequantized exactly as stored (int8 or fp8 times the per-channel scale;
packed int4 minus the zero point times the group scale), and for the A8 schemes a forward
pre-hook quantize-dequantizes its input per token, dynamically, as vLLM's kernels quantize it:

- int8: scale = max|x| / 127 per token, q = round-half-even(x / scale) clamped to [-128, 127];
- fp8: scale = max|x| / 448 per token, x * (1 / scale) clamped to +-448, cast to float8_e4m3fn.

numerics "simulated": dequantized weights, activations quantize-dequantized in float. With
int8_kernels=True a W8A8 model's linears run int8 x int8 -> int32 through torch._int_mm instead
(numerics "kernels"); both compute the same products, the int path without float rounding in
the accumulation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

BUILD_RECORD = "llmc-build.json"  # written by qspec/models/llmc_build.py beside the checkpoint
INT8_MAX = 127.0
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor on a dynamic fp8 scale


def quant_config(folder: str | Path) -> dict:
    """The checkpoint's compressed-tensors quantization_config (config.json), checked."""
    config = json.loads((Path(folder) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors":
        raise ValueError(
            f"{folder}: not a compressed-tensors checkpoint ({quant.get('quant_method')})"
        )
    if quant.get("quantization_status", "compressed") != "compressed":
        raise ValueError(f"{folder}: quantization_status {quant['quantization_status']!r}")
    return quant


def scheme_name(group: dict) -> str:
    """qspec's name for a config group: w8a8, fp8, w4a16 (or wNaM / wNa16 for others)."""
    w, a = group.get("weights") or {}, group.get("input_activations")
    if w.get("type") == "float" and w.get("num_bits") == 8 and a and a.get("type") == "float":
        return "fp8"
    act = f"a{a['num_bits']}" if a else "a16"
    return f"w{w.get('num_bits')}{act}"


def check_group(group: dict) -> None:
    """Refuse what this loader cannot reproduce, rather than run something else silently."""
    w, a = group.get("weights") or {}, group.get("input_activations")
    if w.get("strategy") not in ("channel", "group", "tensor"):
        raise ValueError(f"weight strategy {w.get('strategy')!r} is not supported")
    if w.get("type") == "float" and w.get("num_bits") != 8:
        raise ValueError(f"float weights of {w.get('num_bits')} bits are not supported")
    if a is None:
        return
    ok = a.get("dynamic") is True and a.get("strategy") == "token" and a.get("symmetric")
    if not ok or a.get("num_bits") != 8:
        raise ValueError(f"input activations {a} are not supported (dynamic per-token 8-bit only)")


def matches(name: str, module: torch.nn.Module, targets: list[str]) -> bool:
    """compressed-tensors' target syntax: a class name, 're:<regex>', or a module name."""
    for t in targets:
        if t.startswith("re:") and re.match(t[3:], name):
            return True
        if t == type(module).__name__ or t == name or name.endswith("." + t):
            return True
    return False


def group_for(name: str, module: torch.nn.Module, quant: dict) -> dict | None:
    """The config group that quantizes this module, or None (ignored or untargeted)."""
    if matches(name, module, quant.get("ignore") or []):
        return None
    for group in quant["config_groups"].values():
        if matches(name, module, group.get("targets") or []):
            return group
    return None


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, one file or a sharded index."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    )
    out: dict[str, torch.Tensor] = {}
    for f in files or ["model.safetensors"]:
        out.update(load_file(str(folder / f)))
    return out


def unpack_int32(packed: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 undone along the last dim: element j lies at bits
    num_bits * (j % per_word) of word j // per_word, stored with +2^(bits-1) offset."""
    if 32 % num_bits:
        raise ValueError(f"{num_bits}-bit packing crosses int32 words; not supported")
    per_word = 32 // num_bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * num_bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    values = values.reshape(*packed.shape[:-1], -1)[..., :cols]
    return (values - (1 << (num_bits - 1))).to(torch.int8)


def expand_groups(t: torch.Tensor, cols: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Per-group (or per-channel, per-tensor) parameters broadcast to every input column."""
    if t.dim() == 0 or t.shape[-1] == 1:
        return t if t.dim() else t.reshape(1, 1)
    if g_idx is not None:
        return t[:, g_idx.long()]
    return t.repeat_interleave(cols // t.shape[-1], dim=-1)


def dequantize(tensors: dict[str, torch.Tensor], prefix: str, group: dict) -> torch.Tensor:
    """One linear's weight in float32, exactly as stored: (q - zero_point) * scale."""
    w = group["weights"]
    scale = tensors[f"{prefix}.weight_scale"].float()
    if f"{prefix}.weight_packed" in tensors:
        rows, cols = (int(x) for x in tensors[f"{prefix}.weight_shape"])
        q = unpack_int32(tensors[f"{prefix}.weight_packed"], w["num_bits"], cols)[:rows]
    else:
        q = tensors[f"{prefix}.weight"]
        rows, cols = q.shape
    zp = tensors.get(f"{prefix}.weight_zero_point")
    if zp is not None and zp.dtype == torch.int32 and f"{prefix}.weight_packed" in tensors:
        zp = unpack_int32(zp.t().contiguous(), w["num_bits"], rows).t()  # packed along dim 0
    g_idx = tensors.get(f"{prefix}.weight_g_idx")
    q = q.float()
    if zp is not None:
        q = q - expand_groups(zp.float(), cols, g_idx)
    return q * expand_groups(scale, cols, g_idx)


def int8_qdq(x: torch.Tensor) -> torch.Tensor:
    """Dynamic symmetric int8 per token, as vLLM's dynamic_scaled_int8_quant: scale = max|x|/127."""
    q, scale = int8_quant(x)
    return (q.float() * scale).to(x.dtype)


def int8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and per-token float32 scales of x (a zero row keeps scale 1 and q 0)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


def fp8_qdq(x: torch.Tensor) -> torch.Tensor:
    """Dynamic fp8 e4m3 per token, as vLLM's QuantFP8: scale = max|x|/448 (at least
    FP8_MIN_SCALE), x times the scale's reciprocal, saturated to +-448."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (xf * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def activation_hook(group: dict):
    """A forward pre-hook that quantize-dequantizes a linear's input as the scheme does."""
    a = group.get("input_activations")
    if a is None:
        return None
    qdq = fp8_qdq if a["type"] == "float" else int8_qdq
    return lambda module, args: (qdq(args[0]), *args[1:])


def int8_forward(module: torch.nn.Linear):
    """A W8A8 linear's forward through torch._int_mm: int8 activations x int8 weights -> int32,
    then both scales. The weight stays [out, in] int8: its transpose view is the fast layout on
    CPU (the contiguous [in, out] copy ran ~100x slower here)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        q, a_scale = int8_quant(flat)
        rows = q.shape[0]
        if q.is_cuda and rows <= 16:  # CUDA's int8 matmul wants more than 16 rows
            q = torch.nn.functional.pad(q, (0, 0, 0, 17 - rows))
        acc = torch._int_mm(q, module.weight.t())[:rows]
        y = (acc.float() * a_scale * module.weight_scale.reshape(1, -1)).to(x.dtype)
        if module.bias is not None:
            y = y + module.bias
        return y.reshape(*x.shape[:-1], -1)

    return forward


def fresh_model(folder: Path, dtype: torch.dtype):
    """The architecture of the checkpoint with its quantization_config dropped, so transformers
    builds plain nn.Linear layers (and asks for no compressed-tensors package)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


@torch.no_grad()
def load_compressed(
    folder: str | Path, device: str = "cpu", dtype=torch.float32, int8_kernels: bool = False
):
    """(model, info): the checkpoint in a transformers model with the scheme's numerics.

    info: scheme, format, numerics ("simulated" or "kernels"), the quantized linears' count,
    the bytes their weights take as stored, and the build record when llmc_build.py wrote one.
    int8_kernels: W8A8 linears keep int8 weights and run torch._int_mm (numerics "kernels").
    """
    folder = Path(folder)
    quant = quant_config(folder)
    model = fresh_model(folder, dtype)
    tensors = read_tensors(folder)
    own = model.state_dict()
    plain = {k: v for k, v in tensors.items() if k in own and is_plain(v)}
    missing, _ = model.load_state_dict(plain, strict=False)
    quantized = quantize_linears(model, tensors, quant, int8_kernels)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    done = {f"{name}.weight" for name in quantized} | tied
    left = [k for k in missing if k not in done]
    if left:
        raise ValueError(f"{folder}: checkpoint lacks {left[:5]} ({len(left)} in all)")
    model.tie_weights()
    model = model.to(device).eval()
    out = info(folder, quant, quantized, int8_kernels)
    # what the quantized linears take here (dequantized), against what they take as stored
    weights = [model.get_submodule(name).weight for name in quantized]
    out["quantized_loaded_bytes"] = sum(w.numel() * w.element_size() for w in weights)
    return model, out


def is_plain(t: torch.Tensor) -> bool:
    """A tensor that loads as it is (cast to the model's dtype): not a quantized weight."""
    return t.is_floating_point() and t.element_size() > 1


def quantize_linears(model, tensors: dict, quant: dict, int8_kernels: bool) -> dict:
    """Give each quantized linear its weight as stored (dequantized, or int8 for the int8 path)
    and its input's quantization; returns name -> (config group, bytes stored for it)."""
    out: dict[str, tuple[dict, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or f"{name}.weight_scale" not in tensors:
            continue
        group = group_for(name, module, quant)
        if group is None:
            raise ValueError(f"{name} has a weight_scale but no config group quantizes it")
        check_group(group)
        stored = sum(v.nbytes for k, v in tensors.items() if k.startswith(f"{name}.weight"))
        out[name] = (group, stored)
        if int8_kernels and scheme_name(group) == "w8a8":
            q, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"].float()
            module.weight = torch.nn.Parameter(q, requires_grad=False)
            module.register_buffer("weight_scale", scale.reshape(-1))
            module.forward = int8_forward(module)
            continue
        module.weight.data = dequantize(tensors, name, group).to(module.weight.dtype)
        if (hook := activation_hook(group)) is not None:
            module.register_forward_pre_hook(hook)
    return out


def info(folder: Path, quant: dict, quantized: dict, int8_kernels: bool) -> dict:
    """What ran and what it is built from: the fields a record needs to say which numerics."""
    names = sorted({scheme_name(group) for group, _ in quantized.values()})
    build = folder / BUILD_RECORD
    return {
        "scheme": "+".join(names),
        "format": quant.get("format"),
        "numerics": "kernels" if int8_kernels and names == ["w8a8"] else "simulated",
        "quantized_linears": len(quantized),
        "quantized_weight_bytes": sum(stored for _, stored in quantized.values()),
        "ignore": quant.get("ignore") or [],
        "compressed_tensors_version": quant.get("version"),
        "build": json.loads(build.read_text()) if build.exists() else None,
    }
