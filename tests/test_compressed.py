"""compressed-tensors checkpoints (llm-compressor's W8A8, FP8, W4A16) in qspec's loop.

The fast tests write the checkpoint layout llm-compressor writes (tensor names, config keys,
int4 packing) with a small pure-torch helper, so they need neither llm-compressor nor the
compressed-tensors package; the slow one builds with the real script in the quantization venv.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from qspec.models.compressed import (
    fp8_qdq,
    int8_qdq,
    load_compressed,
    unpack_int32,
)

ROOT = Path(__file__).resolve().parents[1]
QUANT_PYTHON = Path(
    os.environ.get("QSPEC_QUANT_PYTHON", ROOT / ".venvs" / "quant" / "bin" / "python")
)

INT8_CHANNEL = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token"}
INT4_GROUP = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}


def quant_config(weights: dict, activations: dict | None, fmt: str) -> dict:
    """config.json's quantization_config as llm-compressor 0.14 writes it (the keys qspec reads)."""
    weights = {**weights, "dynamic": False}
    acts = None if activations is None else {**activations, "dynamic": True}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "format": fmt}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {**group, "output_activations": None}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "version": "0.19.0",
    }


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 for 4 bits: 8 values per int32, value j at bits 4j, +8."""
    u = (q.to(torch.int32) + 8).reshape(q.shape[0], -1, 8)
    shifts = torch.arange(8, dtype=torch.int32) * 4
    return (u << shifts).sum(-1, dtype=torch.int64).to(torch.int32)


def quantize_linear(w: torch.Tensor, scheme: str, group: int = 16) -> dict[str, torch.Tensor]:
    """One linear's stored tensors: int8 per channel, or int4 per group packed (symmetric)."""
    if scheme == "w8a8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        return {
            "weight": torch.round(w / scale).clamp(-128, 127).to(torch.int8),
            "weight_scale": scale,
        }
    g = w.reshape(w.shape[0], -1, group)
    scale = g.abs().amax(dim=-1) / 7
    q = torch.round(g / scale.unsqueeze(-1)).clamp(-8, 7).to(torch.int8).reshape(w.shape)
    return {
        "weight_packed": pack_int4(q),
        "weight_scale": scale,
        "weight_shape": torch.tensor(w.shape),
    }


def write_checkpoint(model, out: Path, scheme: str = "w8a8") -> Path:
    """The model saved as a compressed-tensors checkpoint of `scheme` (w8a8 or w4a16)."""
    model.save_pretrained(out)
    tensors = load_file(str(out / "model.safetensors"))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            del tensors[f"{name}.weight"]
            stored = quantize_linear(module.weight.detach(), scheme)
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in stored.items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    if scheme == "w8a8":
        config["quantization_config"] = quant_config(INT8_CHANNEL, INT8_TOKEN, "int-quantized")
    else:
        weights = {**INT4_GROUP, "group_size": 16}
        config["quantization_config"] = quant_config(weights, None, "pack-quantized")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def fp32_model():
    return tiny_llama(5, hidden=64)


@pytest.fixture(scope="module")
def w8a8_dir(fp32_model, tmp_path_factory):
    return write_checkpoint(fp32_model, tmp_path_factory.mktemp("w8a8"))


def test_weights_dequantized_as_stored(w8a8_dir):
    model, info = load_compressed(w8a8_dir)
    assert info["scheme"] == "w8a8" and info["numerics"] == "simulated"
    assert info["format"] == "int-quantized" and info["quantized_linears"] == 2 * 7
    tensors = load_file(str(w8a8_dir / "model.safetensors"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        q, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, q.float() * scale)


def test_activation_quantized_per_token_by_hand(w8a8_dir):
    model, _ = load_compressed(w8a8_dir)
    linear = model.model.layers[0].mlp.gate_proj
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 4, 64)  # rows with different ranges
    scale = x.abs().amax(dim=-1, keepdim=True) / 127  # vLLM's, not compressed-tensors' 127.5
    by_hand = torch.round(x / scale).clamp(-128, 127) * scale
    with torch.no_grad():
        assert torch.allclose(linear(x), torch.nn.functional.linear(by_hand, linear.weight))
        assert not torch.allclose(linear(x), torch.nn.functional.linear(x, linear.weight))
    assert torch.equal(int8_qdq(x), by_hand)


def test_lm_head_left_unquantized(w8a8_dir, fp32_model):
    model, _ = load_compressed(w8a8_dir)
    assert torch.equal(model.lm_head.weight, fp32_model.lm_head.weight)
    assert not model.lm_head._forward_pre_hooks


def test_w8a8_logits_close_to_fp32_not_equal(w8a8_dir, fp32_model):
    model, _ = load_compressed(w8a8_dir)
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = fp32_model(ids).logits, model(ids).logits
    delta = (got - ref).abs().max().item()
    assert 0 < delta < 0.05 * ref.abs().max().item()


def test_int8_kernels_match_simulation(w8a8_dir):
    simulated, _ = load_compressed(w8a8_dir)
    kernels, info = load_compressed(w8a8_dir, int8_kernels=True)
    assert info["numerics"] == "kernels"
    assert kernels.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    ids = torch.randint(2, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = simulated(ids).logits, kernels(ids).logits
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4)


def test_fp8_qdq_by_hand():
    x = torch.randn(4, 32) * 3
    scale = x.abs().amax(dim=-1, keepdim=True) / 448
    by_hand = (x * scale.reciprocal()).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(fp8_qdq(x), by_hand)
    assert torch.equal(fp8_qdq(torch.zeros(2, 8)), torch.zeros(2, 8))


def test_int4_unpack_inverts_packing():
    q = torch.randint(-8, 8, (6, 40), dtype=torch.int8)
    assert torch.equal(unpack_int32(pack_int4(q), 4, 40), q)


def test_w4a16_groups_dequantized(fp32_model, tmp_path):
    folder = write_checkpoint(fp32_model, tmp_path / "w4a16", scheme="w4a16")
    model, info = load_compressed(folder)
    assert info["scheme"] == "w4a16" and info["format"] == "pack-quantized"
    w = fp32_model.model.layers[1].self_attn.o_proj.weight
    got = model.model.layers[1].self_attn.o_proj.weight
    expected = quantize_linear(w.detach(), "w4a16")
    assert (got - w).abs().max() <= expected["weight_scale"].max() / 2 + 1e-6
    assert not model.model.layers[1].self_attn.o_proj._forward_pre_hooks  # A16: float inputs


@pytest.mark.slow
def test_llmc_build_w8a8_loads_back(tiny_model_dir, tmp_path):
    """The real builder in the quantization venv: SmoothQuant + GPTQ W8A8 of a tiny model."""
    if not QUANT_PYTHON.exists():
        pytest.skip(f"no quantization venv at {QUANT_PYTHON} (nox -s quant)")
    texts = ["def add(a, b):\n    return a + b\n" * 8, "The json module encodes objects. " * 20]
    (tmp_path / "calib.json").write_text(json.dumps(texts))
    out = tmp_path / "w8a8"
    script = ROOT / "qspec" / "models" / "llmc_build.py"
    args = ["--model", str(tiny_model_dir), "--scheme", "w8a8", "--out", str(out), "--seed", "0"]
    args += ["--calibration", str(tmp_path / "calib.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [str(QUANT_PYTHON), str(script), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model, info = load_compressed(out)
    assert info["scheme"] == "w8a8" and info["build"]["calibration"]["samples"] == 2
    assert "SmoothQuantModifier" in info["build"]["recipe"]
    assert info["build"]["versions"]["llmcompressor"] == "0.14.0.1"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
