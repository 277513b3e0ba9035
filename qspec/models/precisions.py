"""The names a config may use for precisions and drafters, without importing torch.

The builders behind them live in builders.py (PRECISIONS) and engine/drafters.py
(MODEL_FREE_DRAFTERS); a test keeps the three lists in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRECISION_NAMES = (
    "fp32",
    "bf16",
    "fp16",
    "int8",
    "int8-t0",
    "nf4",
    "fp4",
    "gptq-int4",
    # compressed-tensors checkpoints made by llm-compressor, what vLLM users deploy
    "w8a8",
    "fp8",
    "w4a16",
    "awq-w4a16",
)
# built by llm-compressor in the quantization venv (models/compressed_build.py)
COMPRESSED = ("w8a8", "fp8", "w4a16", "awq-w4a16")
MODEL_FREE_DRAFTER_NAMES = ("ngram",)

# Higher rank = closer to the original weights; the reference is the best built target.
# int8-t0 is int8 without outlier decomposition: its weights are the same, its activations
# rounded a little more, so it ranks just below int8.
FIDELITY = {
    "fp32": 6,
    "bf16": 5,
    "fp16": 5,
    "int8": 4,
    "int8-t0": 3.5,
    "w8a8": 3.8,  # int8 weights per channel, int8 activations per token (SmoothQuant)
    "fp8": 3.9,
    "gptq-int4": 3,
    "w4a16": 3,
    "awq-w4a16": 3,
    "nf4": 2,
    "fp4": 1,
}


def reference_precision(precisions: list[str], device: str) -> str:
    """fp32 on CPU, fp16 (or bf16) on CUDA, else the highest-fidelity precision asked for."""
    preferred = ["fp32", "bf16", "fp16"] if device == "cpu" else ["fp16", "bf16", "fp32"]
    for p in preferred:
        if p in precisions:
            return p
    return max(precisions, key=lambda p: FIDELITY.get(p, 0))


# Layer-skip self-drafts (engine/layerskip.py): skip-50%, skip:3,5,7, skip-search, nf4+skip-50%
_SKIP = re.compile(
    r"^(?:(?P<precision>[\w-]+?)\+)?skip"
    r"(?:-(?P<pct>\d{1,2})%|:(?P<layers>\d+(?:,\d+)*)|(?P<search>-search))$"
)


@dataclass(frozen=True)
class SkipName:
    precision: str | None  # None: the cell's own target variant
    fraction: float | None = None
    layers: tuple[int, ...] | None = None
    search: bool = False


def parse_skip(name: str) -> SkipName | None:
    """The parts of a layer-skip drafter name, or None when it is not one."""
    m = _SKIP.match(name)
    if m is None:
        return None
    layers = tuple(int(x) for x in m["layers"].split(",")) if m["layers"] else None
    fraction = int(m["pct"]) / 100 if m["pct"] else None
    return SkipName(m["precision"], fraction, layers, bool(m["search"]))


# The target model's own variant drafting for it (self:int8, self:gptq-int4): the third kind of
# draft beside another model's variants and model-free lookup, named apart from the draft
# model's variants of the same precision when [draft] names another model.
SELF = "self:"


def self_precision(name: str) -> str | None:
    """The target precision a self-draft (self:<precision>) names, or None."""
    return name.removeprefix(SELF) if name.startswith(SELF) else None


# EAGLE-3 draft heads (models/heads.py): trained by qspec on the reference target variant
# ("eagle3", what users deploy beside a quantized target) or on the cell's own target variant
# ("eagle3-matched"), or a user's checkpoint ("eagle3:<path or hub id>")
HEAD = "eagle3"
HEAD_MATCHED = "eagle3-matched"
HEAD_USER = "eagle3:"


def head_kind(name: str | None) -> str | None:
    """ "reference", "matched" or "user" for a head drafter's name, else None."""
    if name == HEAD:
        return "reference"
    if name == HEAD_MATCHED:
        return "matched"
    if name is not None and name.startswith(HEAD_USER):
        return "user"
    return None


def drafter_variant(name: str) -> tuple[str, str] | None:
    """(role, precision) of the variant a drafter needs built, or None (model-free, a draft
    head, or a layer-skip draft of the cell's own target variant)."""
    if head_kind(name) is not None:
        return None
    own = self_precision(name)
    if own is not None:
        return ("target", own)
    if name in PRECISION_NAMES:
        return ("draft", name)
    skip = parse_skip(name)
    return ("draft", skip.precision) if skip is not None and skip.precision else None


def check_drafter(name: str) -> str | None:
    """None when `name` names a drafter, else what is wrong with it."""
    if name in PRECISION_NAMES or name in MODEL_FREE_DRAFTER_NAMES:
        return None
    if head_kind(name) is not None:
        ref = name.removeprefix(HEAD_USER)
        if head_kind(name) == "user" and not ref:
            return f"{name!r}: give the head's folder or hub id after {HEAD_USER!r}"
        return None
    own = self_precision(name)
    if own is not None:
        allowed = ", ".join(PRECISION_NAMES)
        return (
            None
            if own in PRECISION_NAMES
            else f"{name!r}: unknown precision {own!r} after {SELF!r} (allowed: {allowed})"
        )
    skip = parse_skip(name)
    if skip is None:
        allowed = ", ".join([*PRECISION_NAMES, *MODEL_FREE_DRAFTER_NAMES])
        return (
            f"unknown precision or drafter {name!r} (allowed: {allowed}, the target's own "
            "variant such as self:int8, a layer-skip draft such as skip-50%, skip:3,5,7, "
            f"skip-search, nf4+skip-50%, or an EAGLE-3 head: {HEAD}, {HEAD_MATCHED}, "
            f"{HEAD_USER}<folder or hub id>)"
        )
    if skip.precision is not None and skip.precision not in PRECISION_NAMES:
        return f"{name!r}: unknown precision {skip.precision!r} before '+skip'"
    if skip.fraction is not None and not 0 < skip.fraction < 1:
        return f"{name!r}: the skipped share must be between 1% and 99%"
    return None
