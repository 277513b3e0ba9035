"""Adaptive draft length: per pairing (suite, target, draft, γ cap, mode), fixed γ beside
confidence stopping and the heuristic schedule, and the oracle bound of the fixed cell (decode
tokens/s had every step drafted exactly what it would accept)."""

from __future__ import annotations

from qspec.engine.draft_length import DRAFT_LENGTHS
from qspec.records import GenerationRecord
from qspec.report.analysis import Run
from qspec.report.format import text


def build(run: Run) -> list[dict]:
    groups: dict[tuple, dict[str, GenerationRecord]] = {}
    for c in run.spec:
        key = (c.suite, c.target, text(c.draft), c.gamma, c.mode)
        groups.setdefault(key, {})[c.draft_length] = c
    out = []
    for (suite, target, draft, gamma, mode), by in groups.items():
        if len(by) < 2 and not any(c.oracle_decode_tokens_per_s for c in by.values()):
            continue  # nothing to set beside the fixed cell
        fixed = by.get("fixed")
        base = run.base_of(next(iter(by.values())))
        names = list(DRAFT_LENGTHS) + sorted(set(by) - set(DRAFT_LENGTHS))
        rows = [{"length": n, "c": by[n]} for n in names if n in by]
        out.append(
            {
                "label": (f"[{suite}] " if run.multi_suite() else "")
                + f"{target} + {run.draft_name(draft, next(iter(by.values())).draft_skip)}",
                "suite": suite,
                "gamma": gamma,
                "mode": mode,
                "rows": rows,
                "base_decode": base.decode_tokens_per_s if base else None,
                "oracle": fixed.oracle_decode_tokens_per_s if fixed else None,
                "oracle_speedup": fixed.oracle_speedup_decode if fixed else None,
            }
        )
    return out
