"""The names a config may use for precisions and drafters, without importing torch.

The builders behind them live in variants.py (PRECISIONS) and drafters.py
(MODEL_FREE_DRAFTERS); a test keeps the three lists in step.
"""

from __future__ import annotations

PRECISION_NAMES = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4", "gptq-int4")
MODEL_FREE_DRAFTER_NAMES = ("ngram",)

# Higher rank = closer to the original weights; the reference is the best built target.
FIDELITY = {"fp32": 6, "bf16": 5, "fp16": 5, "int8": 4, "gptq-int4": 3, "nf4": 2, "fp4": 1}


def reference_precision(precisions: list[str], device: str) -> str:
    """fp32 on CPU, fp16 (or bf16) on CUDA, else the highest-fidelity precision asked for."""
    preferred = ["fp32", "bf16", "fp16"] if device == "cpu" else ["fp16", "bf16", "fp32"]
    for p in preferred:
        if p in precisions:
            return p
    return max(precisions, key=lambda p: FIDELITY.get(p, 0))
