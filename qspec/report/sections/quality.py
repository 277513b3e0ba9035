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


def _variant_pos(variants: list[str], v: str) -> float:
    """A variant's row; int8-t0 (int8 without outlier decomposition) right after int8."""
    if v.endswith("-t0") and v[:-3] in variants:
        return pos(variants, v[:-3]) + 0.5
    return pos(variants, v)
