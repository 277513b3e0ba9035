"""Failures and gaps: variants that could not be built, cells and stages that failed, notes on
the run's files, and for an unfinished run the planned cells that have no record yet."""

from __future__ import annotations

from dataclasses import asdict

from qspec.config import ConfigError, parse_config, resolve_defaults
from qspec.plan import plan
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
    """Generation cells the run's config plans (the runner's own plan) that have no record."""
    try:
        cfg = parse_config(run.config, "run.json config")
        suites = [text(s) for s in (run.info.suites or cfg.suites)]
    except (ConfigError, TypeError, ValueError):
        return []
    have = {(c.kind, c.suite, c.target, c.draft, c.gamma, c.mode) for c in run.cells}
    device = run.info.hardware.get("device", "cpu")
    planned = plan(resolve_defaults(cfg, device), suites, device)
    return [
        asdict(p)
        for p in planned
        if (p.kind, p.suite, p.target, p.draft, p.gamma, p.mode) not in have
    ]
