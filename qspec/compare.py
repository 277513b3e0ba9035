"""A speculative (or transformers-peer) cell against the target-only cell of the same target
and mode: speedup, and in greedy mode whether the outputs are token-identical."""

from __future__ import annotations

from qspec.records import GenerationRecord


def against_baseline(cell: GenerationRecord, base: GenerationRecord | None) -> dict:
    """The fields a cell gains from its baseline (none when there is no ok baseline)."""
    if base is None or not base.ok or not base.tokens_per_s or cell.tokens_per_s is None:
        return {}
    out: dict = {"speedup": cell.tokens_per_s / base.tokens_per_s}
    if cell.mode == "greedy":
        ref_out = {o.id: o.tokens for o in base.outputs}
        mismatches = [o.id for o in cell.outputs if o.tokens != ref_out.get(o.id)]
        out.update(lossless=not mismatches, lossless_mismatches=mismatches)
    return out
