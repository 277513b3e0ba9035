"""Pairing matrix: per suite, mode and γ, target × draft tables and heatmaps of speedup,
acceptance rate, τ and α, with transformers' assisted generation beside each cell."""

from __future__ import annotations

import math

from qspec.records import GenerationRecord, Kind
from qspec.report import plots
from qspec.report.analysis import Run, pos
from qspec.report.format import fmt, interval, text

Grid = dict[tuple[str, str], GenerationRecord]


def build(run: Run) -> dict:
    keys = []
    for c in run.ok:
        key = (c.suite, c.mode, c.gamma)
        fixed = c.draft_length == "fixed"
        if fixed and c.kind in (Kind.SPECULATIVE, Kind.HF_ASSISTED) and key not in keys:
            keys.append(key)
    keys.sort(key=lambda k: (pos(run.suites, k[0]), pos(run.modes, k[1]), k[2]))
    groups = [_group(run, *k) for k in keys]
    return {
        "groups": [g for g in groups if g is not None],
        "few_drafts": FEW_DRAFTS,
        "wide_speedup": WIDE_SPEEDUP,
    }


def _group(run: Run, suite: str, mode: str, gamma: int) -> dict | None:
    key = (suite, mode, gamma)
    spec: Grid = {}
    hf: Grid = {}
    for c in run.ok:
        if (c.suite, c.mode, c.gamma) != key or c.draft_length != "fixed":
            continue
        if c.kind in (Kind.SPECULATIVE, Kind.HF_ASSISTED):
            (spec if c.kind == Kind.SPECULATIVE else hf)[(c.target, text(c.draft))] = c
    rows = [t for t in run.targets if any(k[0] == t for k in list(spec) + list(hf))]
    cols = [d for d in run.drafts if any(k[1] == d for k in list(spec) + list(hf))]
    if not rows or not cols:
        return None
    failed: Grid = {}
    for c in run.cells:
        if c.kind == Kind.SPECULATIVE and not c.ok and (c.suite, c.mode, c.gamma) == key:
            failed.setdefault((c.target, text(c.draft)), c)
    table = [
        {
            "target": t,
            "cells": [
                {
                    "spec": spec.get((t, d)),
                    "hf": hf.get((t, d)),
                    "failed": failed.get((t, d)),
                    "uncertain": uncertainty(spec[(t, d)]) if (t, d) in spec else [],
                }
                for d in cols
            ],
        }
        for t in rows
    ]
    figure = None
    if spec:
        title = f"suite {suite}, {mode}, γ={gamma}: target × draft"
        figure = plots.try_figure(
            "matrix", plots.heatmaps, _panels(spec, rows, cols, gamma), rows, cols, title
        )
    skips = {text(c.draft): c.draft_skip for c in list(spec.values()) + list(hf.values())}
    return {
        "suite": suite,
        "mode": mode,
        "gamma": gamma,
        "cols": [run.draft_name(d, skips.get(d)) for d in cols],
        "rows": table,
        "figure": figure,
        "caption": run.caption(list(spec.values())),
        "n_hf": len(hf),
    }


def _panels(spec: Grid, rows: list[str], cols: list[str], gamma: int) -> list[dict]:
    def grid(field):
        return [[getattr(spec.get((t, d)), field, None) for d in cols] for t in rows]

    sp = [[v if v is not None and v > 0 else None for v in r] for r in grid("speedup")]
    cells = [[spec.get((t, d)) for d in cols] for t in rows]
    top = max([abs(math.log(v)) for r in sp for v in r if v] + [math.log(1.5)])
    alpha_notes = [
        [None if v is None else f"pred {fmt(v)}" for v in r] for r in grid("alpha_predicted")
    ]
    return [
        {
            "title": "measured speedup (×)",
            "values": [[math.log(v) if v else None for v in r] for r in sp],
            "fmt": lambda v: f"{math.exp(v):.2f}×",
            "cmap": "RdBu",
            "vmin": -top,
            "vmax": top,
            "uncertain": _uncertain(cells, wide_speedup),
        },
        {
            "title": "acceptance rate",
            "values": grid("acceptance_rate"),
            "fmt": lambda v: f"{v:.2f}",
            "cmap": "viridis",
            "vmin": 0,
            "vmax": 1,
            "uncertain": _uncertain(cells, few_drafted),
        },
        {
            "title": f"τ (tokens/step, max {gamma + 1})",
            "values": grid("tau"),
            "fmt": lambda v: f"{v:.2f}",
            "cmap": "viridis",
            "vmin": 1,
            "vmax": (gamma or 1) + 1,
        },
        {
            "title": "α measured (α predicted)",
            "values": grid("alpha_measured"),
            "fmt": lambda v: f"{v:.2f}",
            "cmap": "viridis",
            "vmin": 0,
            "vmax": 1,
            "notes": alpha_notes,
            "uncertain": _uncertain(cells, few_tested),
        },
    ]


# A figure resting on fewer tested drafts than this, or a speedup interval wider than this
# ratio (high / low), is marked in the heatmaps and the table: it must not look as sure as
# one measured on hundreds.
FEW_DRAFTS = 20
WIDE_SPEEDUP = 1.5


def few_tested(c) -> str | None:
    return f"n={c.tested}" if c.tested is not None and c.tested < FEW_DRAFTS else None


def few_drafted(c) -> str | None:
    return f"n={c.drafted}" if c.drafted is not None and c.drafted < FEW_DRAFTS else None


def wide_speedup(c) -> str | None:
    ci = interval(c.speedup_ci95)
    if ci is None or ci[0] <= 0 or ci[1] / ci[0] <= WIDE_SPEEDUP:
        return None
    return f"CI {ci[0]:.2f}–{ci[1]:.2f}"


def uncertainty(c) -> list[str]:
    """Why a cell's figures are uncertain, for the table (empty when they are not)."""
    out = []
    if few_tested(c):
        out.append(f"α on {c.tested} tested drafts (< {FEW_DRAFTS})")
    if wide_speedup(c):
        out.append(f"speedup interval wider than {WIDE_SPEEDUP}× ({wide_speedup(c)})")
    return out


def _uncertain(cells, why) -> dict:
    return {
        (i, j): why(c)
        for i, row in enumerate(cells)
        for j, c in enumerate(row)
        if c is not None and why(c)
    }
