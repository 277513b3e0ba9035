"""Pairing matrix: per suite, mode and γ, target × draft tables and heatmaps of speedup,
acceptance rate, τ and α, with transformers' assisted generation beside each cell."""

from __future__ import annotations

import math

from qspec.records import GenerationRecord, Kind
from qspec.report import plots
from qspec.report.analysis import Run, draft_name, pos
from qspec.report.format import fmt, text

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
    return {"groups": [g for g in groups if g is not None]}


def _group(run: Run, suite: str, mode: str, gamma: int) -> dict | None:
    key = (suite, mode, gamma)
    spec: Grid = {}
    hf: Grid = {}
    for c in run.ok:
        if (c.suite, c.mode, c.gamma) == key and c.draft_length == "fixed":
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
                {"spec": spec.get((t, d)), "hf": hf.get((t, d)), "failed": failed.get((t, d))}
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
        "cols": [draft_name(d, skips.get(d)) for d in cols],
        "rows": table,
        "figure": figure,
        "caption": run.caption(list(spec.values())),
        "n_hf": len(hf),
    }


def _panels(spec: Grid, rows: list[str], cols: list[str], gamma: int) -> list[dict]:
    def grid(field):
        return [[getattr(spec.get((t, d)), field, None) for d in cols] for t in rows]

    sp = [[v if v is not None and v > 0 else None for v in r] for r in grid("speedup")]
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
        },
        {
            "title": "acceptance rate",
            "values": grid("acceptance_rate"),
            "fmt": lambda v: f"{v:.2f}",
            "cmap": "viridis",
            "vmin": 0,
            "vmax": 1,
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
        },
    ]
