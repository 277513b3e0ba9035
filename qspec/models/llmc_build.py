"""Build a compressed-tensors checkpoint with llm-compressor (W8A8 int8, FP8 dynamic, W4A16).

A standalone script: it runs in the quantization venv (.venvs/quant, $QSPEC_QUANT_PYTHON),
whose llm-compressor pins transformers and compressed-tensors that neither qspec's venv nor
vLLM's can share, so it imports nothing from qspec. It writes into --out:

- the checkpoint (save_compressed=True) and the tokenizer, as vLLM and transformers load them;
- llmc-build.json: the recipe as text, library versions, the calibration text's sha256 and
  size in samples and tokens, and the seconds the build took.

    python qspec/models/llmc_build.py --model DIR --scheme w8a8 --calibration texts.json \
        --out DIR --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

SCHEMES = ("w8a8", "fp8", "w4a16", "awq-w4a16")
CALIBRATED = ("w8a8", "w4a16", "awq-w4a16")  # fp8 dynamic is data-free
IGNORE = ["lm_head"]  # as llm-compressor's examples: the LM head stays in full precision
SMOOTHING = 0.8  # SmoothQuant strength of llm-compressor's W8A8 int8 examples
BUILD_RECORD = "llmc-build.json"
LIBRARIES = ("llmcompressor", "compressed-tensors", "transformers", "torch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder of a transformers model (fp32 or bf16)")
    p.add_argument("--scheme", required=True, choices=SCHEMES)
    p.add_argument("--calibration", help="JSON file: a list of texts (not read for fp8)")
    p.add_argument("--out", required=True, help="folder to write (created; must not exist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-length", type=int, default=2048, help="tokens kept per text")
    p.add_argument("--group-size", type=int, default=0, help="W4A16 group; 0: largest that fits")
    return p.parse_args(argv)


def group_size(config, wanted: int = 0) -> int:
    """128 where it divides every linear's input width, else the largest power of two that does:
    vLLM's int4 kernels need whole groups (SmolLM2-135M's 576 takes 64)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    widths = [config.hidden_size, config.intermediate_size, heads * head_dim]
    for group in [wanted] if wanted else (128, 64, 32, 16):
        if all(w % group == 0 for w in widths):
            return group
    raise SystemExit(f"no W4A16 group size divides the layer widths {widths}")


def int4_groups(group: int, symmetric: bool) -> dict:
    """W4A16 with this group size: the preset's layout (int4 weights, per-group scales) with a
    group that fits, written out because the preset fixes 128."""
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric}
    weights.update({"strategy": "group", "group_size": group, "dynamic": False})
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def recipe(scheme: str, config, wanted_group: int = 0) -> list:
    """The modifiers of llm-compressor's own examples for this scheme, lm_head left out."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    if scheme == "w8a8":  # SmoothQuant, then W8A8 rounded to nearest (the example's GPTQ
        # step in its place: 75 s against 29 s for SmolLM2-135M on 2 idle cores, more than a
        # first run's budget leaves; SmoothQuant is what an int8 activation path needs most)
        return [
            SmoothQuantModifier(smoothing_strength=SMOOTHING),
            QuantizationModifier(targets="Linear", scheme="W8A8", ignore=IGNORE),
        ]
    if scheme == "fp8":  # examples/quantization_w8a8_fp8: data-free FP8_DYNAMIC
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE)]
    group = group_size(config, wanted_group)
    if scheme == "w4a16":  # examples/quantization_w4a16: GPTQ, symmetric int4
        return [GPTQModifier(config_groups=int4_groups(group, True), ignore=IGNORE)]
    # examples/awq: AWQ scales, then asymmetric int4 (W4A16_ASYM)
    quant = QuantizationModifier(config_groups=int4_groups(group, False), ignore=IGNORE)
    return [AWQModifier(duo_scaling="both"), quant]


def calibration_set(texts: list[str], tokenizer, max_len: int):
    """One sample per text, tokenized here (llm-compressor takes a tokenized Dataset as it is),
    so that what it calibrates on is exactly what this record counts."""
    from datasets import Dataset

    ids = [tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts]
    ids = [x for x in ids if x]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})


def allow_cpu_only() -> None:
    """AWQ pins its cached activations for faster host-to-device copies, which on a machine
    without an accelerator fails ("RuntimeError: Cannot access accelerator device when none is
    available", llm-compressor 0.14.0.1); pinning changes no numbers, so skip it there."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def build(args: argparse.Namespace) -> dict:
    """Quantize, save compressed, and return the record of what was done."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    allow_cpu_only()
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    mods = recipe(args.scheme, model.config, args.group_size)
    texts: list[str] = []
    kwargs: dict = {}
    if args.scheme in CALIBRATED:
        texts = json.loads(Path(args.calibration).read_text())
        data = calibration_set(texts, tok, args.max_seq_length)
        kwargs = dict(dataset=data, num_calibration_samples=len(data))
        kwargs.update(max_seq_length=args.max_seq_length, shuffle_calibration_samples=False)
    oneshot(model=model, recipe=mods, **kwargs)
    out = Path(args.out)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    record = {
        "scheme": args.scheme,
        "model": str(Path(args.model).resolve()),
        "recipe": recipe_text(mods),
        "versions": {name: version(name) for name in LIBRARIES},
        "seed": args.seed,
        "calibration": calibration_record(texts, kwargs.get("dataset")),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / BUILD_RECORD).write_text(json.dumps(record, indent=1))
    return record


def recipe_text(mods: list) -> str:
    """The recipe as llm-compressor serializes it (YAML), else each modifier's repr."""
    try:
        from llmcompressor.recipe import Recipe

        return Recipe.from_modifiers(mods).yaml()
    except Exception:  # noqa: BLE001 - the record keeps a readable recipe either way
        return "\n".join(repr(m) for m in mods)


def calibration_record(texts: list[str], data) -> dict:
    """Which text calibrated the build, without the text: the hash qspec's GPTQ build records
    (texts joined by blank lines) and the samples and tokens llm-compressor saw."""
    joined = "\n\n".join(texts)
    tokens = sum(len(x) for x in data["input_ids"]) if data is not None else 0
    return {
        "sha256": hashlib.sha256(joined.encode()).hexdigest() if texts else None,
        "documents": len(texts),
        "characters": len(joined),
        "samples": len(data) if data is not None else 0,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scheme in CALIBRATED and not args.calibration:
        raise SystemExit(f"--scheme {args.scheme} needs --calibration (a JSON list of texts)")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(f"--out {args.out} exists and is not empty")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    record = build(args)
    print(json.dumps({k: record[k] for k in ("scheme", "seconds", "calibration")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
