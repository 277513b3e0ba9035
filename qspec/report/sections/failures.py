"""Failures and gaps: variants that could not be built, cells and stages that failed, notes on
the run's files, and for an unfinished run the planned cells that have no record yet."""

from __future__ import annotations

from qspec.config import ConfigError, parse_config, resolve_defaults
from qspec.plan import SuitePlan, planned
from qspec.records import GenerationRecord
from qspec.report.analysis import Run
from qspec.report.format import text


def build(run: Run) -> dict:
    status = text(run.info.status) or "unknown"
    stages = run.quality + run.tasks + run.task_lossless + run.screens
    return {
        "variants": [v for v in run.variants if not v.ok],
        "cells": [c for c in run.cells if not c.ok],
        "other": [r for r in stages if not r.ok],
        "missing": missing_cells(run) if status != "complete" else [],
        "status": status,
        "cells_failed": run.info.cells_failed,
        "notes": run.notes,
        "non_lossless": [
            {"target": t, "draft": d, "reasons": r} for (t, d), r in run.not_lossless.items()
        ],
    }


def missing_cells(run: Run) -> list[dict]:
    """Generation cells the run's config plans (plan.planned, the runner's own list) that have
    no record."""
    try:
        # runs before sampled_targets existed sampled every target
        cfg = parse_config({"sampled_targets": "all", **run.config}, "run.json config")
        suites = [SuitePlan(text(s)) for s in (run.info.suites or cfg.suites)]
    except (ConfigError, TypeError, ValueError):
        return []
    have = {_coords(c) for c in run.cells}
    device = run.info.hardware.get("device", "cpu")
    cells = [p.record for p in planned(resolve_defaults(cfg, device), suites, device, {})]
    return [
        {k: getattr(c, k) for k in CELL_COORDS}
        for c in cells
        if isinstance(c, GenerationRecord) and _coords(c) not in have
    ]


CELL_COORDS = ("kind", "suite", "target", "draft", "gamma", "mode", "draft_length")


def _coords(c: GenerationRecord) -> tuple:
    return tuple(getattr(c, k) for k in CELL_COORDS)
