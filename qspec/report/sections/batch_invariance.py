"""Batch invariance: does one k-token forward of a variant give the logits of k one-token
forwards? Greedy speculative output can equal target-only output only for batch-invariant
targets; each pairing that is not lossless is explained from its target's figures and, per
mismatched prompt, the first divergent position and the target's top-1/top-2 margin there."""

from __future__ import annotations

from qspec.records import VariantRecord
from qspec.report.analysis import Run
from qspec.report.format import num, text

NEAR_TIE_LOGITS = 0.5  # without the target's own figures: a margin this small is a near-tie
FIELDS = ("positions", "k", "max_abs_logit_diff", "argmax_flips", "argmax_flips_per_1000")


def _figures(v: VariantRecord) -> dict:
    bi = v.batch_invariance
    out = {f: num(getattr(bi, f, None)) for f in FIELDS}
    out["method"] = text(bi.method if bi is not None else None)
    out["invariant"] = v.batch_invariant
    return out


def build(run: Run) -> dict:
    rows = [{"precision": v.precision, "model": v.model, **_figures(v)} for v in run.variants]
    by_precision = {r["precision"]: r for r in rows}
    explained = []
    for c in run.spec:
        if c.mode != "greedy" or c.lossless is not False:
            continue
        t = by_precision.get(c.target)
        noise = t["max_abs_logit_diff"] if t else None
        limit = noise if noise is not None else NEAR_TIE_LOGITS
        mismatches = []
        for d in c.lossless_divergence:
            margin = num(d.top1_top2_margin)
            mismatches.append(
                {
                    "id": text(d.id),
                    "position": d.position,
                    "margin": margin,
                    "near_tie": None if margin is None else margin <= limit,
                }
            )
        explained.append(
            {
                "label": run.label(c),
                "target": t,
                "target_invariant": c.target_batch_invariant
                if c.target_batch_invariant is not None
                else (t["invariant"] if t else None),
                "limit": limit,
                "limit_from_target": noise is not None,
                "mismatches": mismatches,
                "ids": c.lossless_mismatches,
            }
        )
    int8, t0 = by_precision.get("int8"), by_precision.get("int8-t0")
    return {
        "rows": rows,
        "measured": any(r["invariant"] is not None for r in rows),
        "explained": explained,
        "int8_t0": {"int8": int8, "t0": t0} if t0 is not None else None,
        "method": next((r["method"] for r in rows if r["method"]), ""),
        "near_tie": NEAR_TIE_LOGITS,
    }
