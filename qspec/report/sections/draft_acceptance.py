"""Acceptance: per suite, mode and γ, the chance each draft position is accepted once reached
and how many drafts each step accepted; then α predicted vs measured and the γ sweep."""

from __future__ import annotations

from qspec.records import GenerationRecord
from qspec.report import plots
from qspec.report.analysis import Run, pos
from qspec.report.sections import adaptive, alpha, sweep

MAX_GAMMA_COLUMNS = 64  # a nonsense gamma must not blow up the tables


def build(run: Run) -> dict:
    keys = []
    for c in run.spec:
        if (c.suite, c.mode, c.gamma) not in keys:
            keys.append((c.suite, c.mode, c.gamma))
    keys.sort(key=lambda k: (pos(run.suites, k[0]), pos(run.modes, k[1]), k[2]))
    groups = []
    for key in keys:
        cs = [c for c in run.spec if (c.suite, c.mode, c.gamma) == key]
        groups.append(_group(run, *key, cs))
    return {
        "groups": groups,
        **alpha.build(run),
        "sweeps": sweep.build(run),
        "adaptive": adaptive.build(run),
        "screens": run.screens,
    }


def _row(run: Run, c: GenerationRecord, g: int) -> dict:
    """One pairing's per-position acceptance (g positions) and histogram (0..g accepted)."""
    pa, pt, hist = c.position_acceptance, c.position_tested, c.accepted_histogram
    pu = c.position_acceptance_unconditional
    total = sum(hist)
    label = f"{c.target} + {run.draft_name(c.draft, c.draft_skip)}"
    if c.draft_length != "fixed":
        label += f" ({c.draft_length} draft length)"
    return {
        "c": c,
        "label": label,
        "positions": [
            {
                "p": pa[i] if i < len(pa) else None,
                "n": pt[i] if i < len(pt) else None,
                "u": pu[i] if i < len(pu) else None,
            }
            for i in range(g)
        ],
        "hist": [
            {
                "n": hist[i] if i < len(hist) else None,
                "f": hist[i] / total if i < len(hist) and total else None,
            }
            for i in range(g + 1)
        ],
        "hist_total": total,
    }


def _group(run: Run, suite: str, mode: str, gamma: int, cs: list[GenerationRecord]) -> dict:
    g = max(0, min(gamma, MAX_GAMMA_COLUMNS))
    rows = [_row(run, c, g) for c in cs]
    figure = None
    if rows and g > 0:
        figure = plots.try_figure(
            "acceptance", plots.grouped_bars, _panels(rows, g), f"suite {suite}, {mode}, γ={gamma}"
        )
    return {
        "suite": suite,
        "mode": mode,
        "gamma": gamma,
        "g": g,
        "rows": rows,
        "figure": figure,
        "caption": run.caption(cs),
    }


def _panels(rows: list[dict], g: int) -> list[dict]:
    return [
        {
            "title": "conditional acceptance per draft position",
            "xlabel": "draft position (1 = first drafted token)",
            "ylabel": "P(accept | reached)",
            "categories": [str(i + 1) for i in range(g)],
            "series": [(r["label"], [p["p"] for p in r["positions"]]) for r in rows],
            "ann": [
                [f"n={p['n']}" if p["n"] is not None else "" for p in r["positions"]] for r in rows
            ],
            "ylim": (0, 1.12),
            "legend": True,
        },
        {
            "title": "accepted drafts per step (share of steps)",
            "xlabel": "accepted drafts in the step",
            "ylabel": "share of steps",
            "categories": [str(i) for i in range(g + 1)],
            "series": [(r["label"], [h["f"] for h in r["hist"]]) for r in rows],
            "ylim": (0, 1.05),
            "legend": True,
        },
    ]
