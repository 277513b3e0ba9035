"""Run metadata: status, times, hardware, versions and the configuration as run.json holds
them, so a reader can tell what was measured and reproduce it."""

from __future__ import annotations

import datetime as dt
import json

from qspec.report.analysis import Run
from qspec.report.format import text


def _parse_time(s) -> dt.datetime | None:
    if not isinstance(s, str):
        return None
    for f in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"):
        try:
            return dt.datetime.strptime(s, f)
        except ValueError:
            pass
    try:
        return dt.datetime.fromisoformat(s)
    except ValueError:
        return None


def duration(started, finished) -> str | None:
    a, b = _parse_time(started), _parse_time(finished)
    if a is None or b is None or (a.tzinfo is None) != (b.tzinfo is None):
        return None
    s = int((b - a).total_seconds())
    if s < 0:
        return None
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def build(run: Run) -> dict:
    info = run.info
    records = [run.cells, run.variants, run.quality, run.screens, run.tasks, run.task_lossless]
    return {
        "status": text(info.status) or "unknown",
        "started": info.started,
        "finished": info.finished,
        "duration": duration(info.started, info.finished),
        "seed": info.seed if "seed" in info.model_fields_set else run.config.get("seed"),
        "suites": run.suites,
        "hardware": info.hardware,
        "hardware_label": run.hardware_label,
        "executor": info.executor,
        "versions": info.versions,
        "config": json.dumps(run.config, indent=2, default=str) if run.config else None,
        "cells_failed": info.cells_failed,
        "n_records": sum(map(len, records)),
        "n_cells": len(run.cells),
        "reference": run.reference,
        # fields a newer writer added; memory_bandwidth is a field, shown in the roofline section
        "extra": info.model_extra or {},
    }
