"""EAGLE-3 head checkpoints: the layouts vLLM 0.32 loads, read back and checked against a target.

Two layouts (both a config.json and model.safetensors beside it):

- "eagle3", the original EAGLE-3 one: a llama config with architectures
  ["LlamaForCausalLMEagle3"], num_hidden_layers 1, draft_vocab_size, target_hidden_size and
  eagle_aux_hidden_state_layer_ids at the top level (where vLLM's runner reads them); weights
  fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t/t2d when the draft vocabulary is
  reduced, no embed_tokens (vLLM then shares the target's).
- "speculators" (vllm-project/speculators): speculators_model_type "eagle3", the llama part in
  transformer_layer_config, speculators_config with proposal_methods and verifier; weights
  layers.0.* instead of midlayer.*. vLLM reads norm_before_residual as True when absent here.

qspec adds a "qspec" block (the verifier it was trained for: name, hidden size, vocabulary,
layers) that vLLM ignores and `head_problems` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qspec.engine.eagle_head import EagleHead, HeadConfig, rope_of

ARCHITECTURE = "LlamaForCausalLMEagle3"
LAYOUTS = ("eagle3", "speculators")
# config flags of EAGLE-3 variants that vLLM knows and qspec's head does not compute
UNSUPPORTED_FLAGS = ("norm_before_fc", "fc_norm", "norm_output", "attention_bias")


def layout_of(config: dict) -> str | None:
    """ "speculators", "eagle3", or None when the config is not an EAGLE-3 head's."""
    if "speculators_model_type" in config:
        return "speculators"
    archs = config.get("architectures") or []
    if any("eagle3" in a.lower() for a in archs) or "eagle_config" in config:
        return "eagle3"
    return None


def _llama_fields(cfg: HeadConfig) -> dict:
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    return {
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_positions,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": "float32",
    }


def save_head(
    head: EagleHead, folder, verifier: dict, layout: str = "eagle3", speculative_tokens: int = 3
) -> Path:
    """Write config.json + model.safetensors. `verifier`: at least name_or_path; qspec adds the
    target's sizes from the head's config. speculative_tokens only matters in the speculators
    layout (vLLM requires it there)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")
    cfg, folder = head.cfg, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    if head.d2t is not None:  # vLLM skips t2d; the original EAGLE-3 layout carries it
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[head.draft_ids().cpu()] = True
        weights["d2t"], weights["t2d"] = head.d2t.cpu(), t2d
    aux = list(cfg.aux_layers)
    eagle = {
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "norm_before_residual": cfg.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": aux,
    }
    qspec = {
        "verifier": {
            "hidden_size": cfg.target_hidden_size,
            "vocab_size": cfg.vocab_size,
            **verifier,
        }
    }
    if layout == "eagle3":
        config = {
            "architectures": [ARCHITECTURE],
            **_llama_fields(cfg),
            **eagle,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True},
            "qspec": qspec,
        }
    else:
        weights = {k.replace("midlayer.", "layers.0.", 1): v for k, v in weights.items()}
        config = {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "transformer_layer_config": {
                "architectures": ["LlamaForCausalLM"],
                **_llama_fields(cfg),
            },
            **eagle,
            "speculators_config": {
                "algorithm": "eagle3",
                "default_proposal_method": "greedy",
                "proposal_methods": [
                    {"proposal_type": "greedy", "speculative_tokens": speculative_tokens}
                ],
                "verifier": {
                    "name_or_path": verifier.get("name_or_path"),
                    "architectures": verifier.get("architectures", ["LlamaForCausalLM"]),
                },
            },
            "qspec": qspec,
        }
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_config(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def _llama_part(config: dict) -> dict:
    if layout_of(config) == "speculators":
        return config.get("transformer_layer_config") or {}
    return config


def aux_ids(config: dict, target_layers: int) -> tuple[int, ...]:
    """Where vLLM reads them (top level, then eagle_config), else vLLM's llama default."""
    ids = config.get("eagle_aux_hidden_state_layer_ids") or (
        (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    )
    if not ids:
        ids = (2, target_layers // 2, target_layers - 3)
    return tuple(int(i) for i in ids)


def head_config(config: dict, target_config) -> HeadConfig:
    """A HeadConfig from either layout, with vLLM's defaults for what the file leaves out."""
    llama = _llama_part(config)
    target = target_config.get_text_config(decoder=True)

    class _Ns:  # rope_of reads attributes
        pass

    ns = _Ns()
    ns.__dict__.update(llama)
    theta, scaling = rope_of(ns)
    hidden = llama["hidden_size"]
    default_nbr = layout_of(config) == "speculators"  # vLLM's speculators parser: True
    return HeadConfig(
        hidden_size=hidden,
        intermediate_size=llama["intermediate_size"],
        heads=llama["num_attention_heads"],
        kv_heads=llama.get("num_key_value_heads") or llama["num_attention_heads"],
        head_dim=llama.get("head_dim") or hidden // llama["num_attention_heads"],
        rms_norm_eps=llama.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        vocab_size=llama["vocab_size"],
        draft_vocab_size=config.get("draft_vocab_size") or llama["vocab_size"],
        aux_layers=aux_ids(config, target.num_hidden_layers),
        target_hidden_size=config.get("target_hidden_size") or hidden,
        max_positions=llama.get("max_position_embeddings", target.max_position_embeddings),
        norm_before_residual=bool(config.get("norm_before_residual", default_nbr)),
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(folder / f)).items()}
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def load_head(folder, target_model) -> EagleHead:
    """The head in `folder` (either layout) over the target's embedding, in the target's dtype.

    As in vLLM: an embed_tokens of its own is used when the checkpoint has one, the target's
    LM head when it has none (its draft vocabulary must then be the target's)."""
    folder = Path(folder)
    config = read_config(folder)
    problems = head_problems(config, target_model)
    if problems:
        raise ValueError(f"{folder}: " + "; ".join(problems))
    cfg = head_config(config, target_model.config)
    out = target_model.get_output_embeddings().weight
    weights = {k.replace("layers.0.", "midlayer.", 1): v for k, v in _weights(folder).items()}
    weights.pop("t2d", None)
    embed = weights.pop("embed_tokens.weight", None)
    if embed is None:
        embed = target_model.get_input_embeddings().weight
    weights.setdefault("lm_head.weight", out.detach())
    head = EagleHead(cfg, embed.to(out.device))
    head.load_state_dict({k: v.to(out.device) for k, v in weights.items()}, strict=True)
    return head.to(out.dtype).eval().requires_grad_(False)


def _name(path_or_name) -> str:
    return str(path_or_name).rstrip("/").split("/")[-1].lower() if path_or_name else ""


def head_problems(folder_config: dict, target_model) -> list[str]:
    """Every way the head's config does not fit this target, each naming the config key, the
    head's value and the target's. Empty when it fits."""
    layout = layout_of(folder_config)
    if layout is None:
        return ["config.json: not an EAGLE-3 head (no speculators_model_type, no Eagle3 arch)"]
    target = target_model.config.get_text_config(decoder=True)
    llama, out = _llama_part(folder_config), []
    prefix = "transformer_layer_config." if layout == "speculators" else ""

    def differs(key, head_value, target_value, where=""):
        if head_value is not None and head_value != target_value:
            out.append(f"{where or key}: head has {head_value}, target has {target_value}")

    if layout == "speculators" and folder_config["speculators_model_type"] != "eagle3":
        out.append(
            f"speculators_model_type: head has {folder_config['speculators_model_type']}"
            ", qspec reads eagle3"
        )
    differs("hidden_size", llama.get("hidden_size"), target.hidden_size, prefix + "hidden_size")
    differs("target_hidden_size", folder_config.get("target_hidden_size"), target.hidden_size)
    differs("vocab_size", llama.get("vocab_size"), target.vocab_size, prefix + "vocab_size")
    draft_vocab = folder_config.get("draft_vocab_size")
    if draft_vocab is not None and draft_vocab > target.vocab_size:
        out.append(f"draft_vocab_size: head has {draft_vocab}, target vocab is {target.vocab_size}")
    layers = target.num_hidden_layers
    ids = aux_ids(folder_config, layers)
    if any(not 0 <= i <= layers for i in ids):
        out.append(
            f"eagle_aux_hidden_state_layer_ids: head has {list(ids)}, target has {layers} "
            f"layers (ids 0..{layers})"
        )
    if llama.get("num_hidden_layers", 1) != 1:
        out.append(
            f"{prefix}num_hidden_layers: head has {llama['num_hidden_layers']}, qspec's head has 1"
        )
    for key in UNSUPPORTED_FLAGS:
        if folder_config.get(key) or llama.get(key):
            out.append(f"{key}: head has true, qspec's head does not compute it")
    rope = (llama.get("rope_parameters") or {}).get("rope_type") or (
        (llama.get("rope_scaling") or {}).get("rope_type", "default")
    )
    if rope != "default":
        out.append(f"{prefix}rope_parameters.rope_type: head has {rope}, qspec's head has default")
    out += _verifier_problems(folder_config, target_model, target)
    return out


def _verifier_problems(config: dict, target_model, target) -> list[str]:
    ours = (config.get("qspec") or {}).get("verifier") or {}
    spec = ((config.get("speculators_config") or {}).get("verifier")) or {}
    out = []
    named = ours.get("name_or_path") or spec.get("name_or_path")
    target_name = getattr(target_model.config, "_name_or_path", "") or getattr(
        target_model, "name_or_path", ""
    )
    key = (
        "qspec.verifier.name_or_path"
        if ours.get("name_or_path")
        else ("speculators_config.verifier.name_or_path")
    )
    # a quantized variant's folder extends its reference's name: a reference-trained head fits it
    a, b = _name(named), _name(target_name)
    if a and b and a not in b and b not in a:
        out.append(f"{key}: head has {named}, target is {target_name}")
    for field, value in (
        ("hidden_size", target.hidden_size),
        ("vocab_size", target.vocab_size),
        ("num_hidden_layers", target.num_hidden_layers),
    ):
        if ours.get(field) is not None and ours[field] != value:
            out.append(f"qspec.verifier.{field}: head has {ours[field]}, target has {value}")
    return out
