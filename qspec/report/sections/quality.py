"""Quality vs reference: perplexity, KL and top-1 agreement per variant and suite, lm-eval task
accuracy, the same tasks with and without speculation, and each variant's budget verdict."""

from __future__ import annotations

from qspec.records import QualityRecord, TaskRecord
from qspec.report.analysis import Run, pos
from qspec.report.budget import (
    PPL_TEST,
    TASK_TEST,
    is_reference,
    ppl_check,
    ppl_delta_pct,
    task_check,
    task_delta_points,
)
from qspec.report.format import text


def build(run: Run) -> dict:
    b = run.budget
    variants = run.all_variants()

    def key(r: QualityRecord | TaskRecord) -> tuple:
        return (pos(run.suites, r.suite), _variant_pos(variants, text(r.variant)))

    rows = []
    for q in sorted(run.quality, key=key):
        other = q.model is not None  # a draft model's own variants, against its own reference
        ref = q.variant == q.reference if other else is_reference(run, q.variant)
        rows.append(
            {
                "r": q,
                "ok": q.ok,
                "delta": None if other else ppl_delta_pct(run, q),
                "check": None if ref or other or not q.ok else ppl_check(run, q),
                "reference": ref,
                "weights": q.weights_bytes or run.variant_weights.get(("any", text(q.variant))),
            }
        )
    tasks = []
    for t in sorted(run.tasks, key=lambda r: (*key(r), r.task)):
        d = task_delta_points(run, t)
        scale = 100 if t.value is not None and abs(t.value) <= 1 else 1
        tasks.append(
            {
                "r": t,
                "ok": t.ok,
                "value_pts": t.value * scale if t.value is not None else None,
                "se_pts": t.stderr * scale if t.stderr is not None else None,
                "delta": d,
                "check": None if is_reference(run, t.variant) or not t.ok else task_check(run, t),
                "reference": is_reference(run, t.variant),
            }
        )
    notes = {v.model_note for v in run.variants}
    return {
        "formats": formats(run),
        "rows": rows,
        "tasks": tasks,
        "task_lossless": run.task_lossless,
        "verdicts": [
            {"variant": v, "quality": run.vq[v]}
            for v in sorted(variants, key=lambda x: _variant_pos(variants, x))
            if v in run.vq
        ],
        "variants": run.variants,
        "common_note": notes.pop() if len(notes) == 1 else None,
        "reference": run.reference,
        "budget": b,
        "tests": {"ppl": PPL_TEST, "task": TASK_TEST},
        "positions": sorted({q.positions for q in run.quality if q.positions is not None}),
    }


def formats(run: Run) -> list[dict]:
    """Per built variant: its scheme, format, builder and the numerics qspec's loop ran it
    with; the engines that ran it; and where both did, how far their greedy tokens agree."""
    out = []
    for v in run.variants:
        if not v.ok or v.model != run.target_ref:
            continue
        in_loop = any(c.target == v.precision and c.is_engine for c in run.ok)
        served = [r for r in run.serving if r.ok and r.target == v.precision and r.draft is None]
        engines = (["qspec's loop"] if in_loop else []) + (["vLLM"] if served else [])
        out.append(
            {
                "v": v,
                "engines": engines,
                "agreement": engines_agreement(run, v.precision, served),
                "recipe": (v.build_record or {}).get("recipe"),
                "calibration": ((v.build_record or {}).get("calibration") or {}).get("sha256"),
                "versions": (v.build_record or {}).get("versions"),
            }
        )
    return out


def engines_agreement(run: Run, target: str, served) -> dict | None:
    """qspec's greedy tokens against vLLM's for the same checkpoint and prompts (the target
    alone at vLLM's lowest level): the share of tokens before the first difference, per prompt
    averaged, and where the first differences fall."""
    mine = next(
        (
            c
            for c in run.ok
            if c.kind == "target_only" and c.target == target and c.mode == "greedy"
        ),
        None,
    )
    theirs = min(
        (r for r in served if r.mode == "greedy"), key=lambda r: r.concurrency, default=None
    )
    if mine is None or theirs is None or not theirs.outputs:
        return None
    shares, first = [], []
    for o in mine.outputs:
        other = theirs.outputs.get(o.id)
        if other is None or not o.tokens:
            continue
        n = next((i for i, (a, b) in enumerate(zip(o.tokens, other, strict=False)) if a != b), None)
        same = min(len(o.tokens), len(other)) if n is None else n
        shares.append(same / len(o.tokens))
        first.append(n)
    if not shares:
        return None
    return {"share": sum(shares) / len(shares), "prompts": len(shares), "first_difference": first}


def _variant_pos(variants: list[str], v: str) -> float:
    """A variant's row; int8-t0 (int8 without outlier decomposition) right after int8."""
    if v.endswith("-t0") and v[:-3] in variants:
        return pos(variants, v[:-3]) + 0.5
    return pos(variants, v)
