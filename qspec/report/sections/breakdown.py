"""Per suite and per category: what each suite measured and its best speedup, then tokens/s and
speedup per prompt category, from each prompt's own output."""

from __future__ import annotations

from qspec.records import GenerationRecord, Kind
from qspec.records.base import PEER_KINDS
from qspec.report.analysis import Run, prompt_times


def build(run: Run) -> dict:
    cells = [c for c in run.ok if c.kind not in PEER_KINDS]
    categories = sorted({cat for c in cells for _, _, cat in prompt_times(c).values()})
    rows = [_category_row(run, c, categories) for c in cells]
    return {
        "suites": [_suite(run, s) for s in run.suites],
        "categories": categories,
        "rows": [r for r in rows if r is not None],
    }


def _suite(run: Run, suite: str) -> dict:
    cs = [c for c in run.cells if c.suite == suite]
    ok = [c for c in cs if c.ok]
    spec = [c for c in ok if c.kind == Kind.SPECULATIVE and c.speedup is not None]
    best = max(spec, key=lambda c: c.speedup) if spec else None
    return {
        "suite": suite,
        "prompts": max([c.n_prompts or 0 for c in ok] or [0]),
        "categories": sorted({o.category for c in ok for o in c.outputs}),
        "ok": len(ok),
        "failed": sum(1 for c in cs if c.status == "failed"),
        "unavailable": sum(1 for c in cs if c.status == "unavailable"),
        "best": best,
        "best_label": run.label(best, suite=False) if best else None,
        "quality": [q for q in run.quality if q.suite == suite],
    }


def _category_row(run: Run, c: GenerationRecord, categories: list[str]) -> dict | None:
    """tokens/s per category, and speedup against target-only on the same prompts."""
    mine = prompt_times(c)
    if not mine:
        return None
    base = run.base_of(c)
    theirs = prompt_times(base) if base is not None and base is not c else {}
    cells = {}
    for cat in categories:
        ids = [p for p, v in mine.items() if v[2] == cat]
        if not ids:
            continue
        n = sum(mine[p][0] for p in ids)
        s = sum(mine[p][1] for p in ids)
        both = [p for p in ids if p in theirs]
        sp = None
        if both:
            a = sum(mine[p][0] for p in both) / sum(mine[p][1] for p in both)
            b = sum(theirs[p][0] for p in both) / sum(theirs[p][1] for p in both)
            sp = a / b if b else None
        cells[cat] = {"tps": n / s if s else None, "speedup": sp, "n": len(ids), "tokens": n}
    return {"label": run.label(c), "kind": c.kind, "cells": cells}
