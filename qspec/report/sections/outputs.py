"""Generated text: the first prompts of every cell, cut to a readable length, with the prompts
whose output differs from the target's own marked."""

from __future__ import annotations

from qspec.report.analysis import Run, n_tokens

MAX_OUTPUT_PROMPTS = 3
MAX_OUTPUT_CHARS = 1500


def build(run: Run) -> dict:
    groups = []
    for c in run.ok:
        if not c.outputs:
            continue
        mismatched = set(c.lossless_mismatches)
        shown = [
            {
                "o": o,
                "text": o.text[:MAX_OUTPUT_CHARS],
                "cut": len(o.text) > MAX_OUTPUT_CHARS,
                "n": n_tokens(o),
                "mismatch": o.id in mismatched,
            }
            for o in c.outputs[:MAX_OUTPUT_PROMPTS]
        ]
        groups.append(
            {"label": run.label(c, suite=True), "c": c, "shown": shown, "total": len(c.outputs)}
        )
    return {"groups": groups}
