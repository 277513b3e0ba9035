"""Latency: time to first token, time per output token and inter-token latency per cell (as
vLLM names them), torch.compile's warm-up cost (never counted), and speculative speedup by
output length, prompt by prompt."""

from __future__ import annotations

from qspec.records import GenerationRecord, Kind
from qspec.report import plots
from qspec.report.analysis import Run, prompt_times
from qspec.report.sections import compile_cost

LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)


def build(run: Run) -> dict:
    rows = [c for c in run.ok if c.kind in (Kind.TARGET_ONLY, Kind.SPECULATIVE)]
    brows = _bucket_rows(run)
    buckets = sorted({b for r in brows for b in r["cells"]})
    figure = None
    if brows and len(buckets) > 1:
        figure = plots.try_figure("bucket", plots.lines, [_bucket_panel(brows, buckets)])
    return {
        "rows": [{"c": c, "label": run.label(c)} for c in rows],
        "figures": _figures(run, rows),
        "caption": run.caption(rows),
        "compile": compile_cost.build(run, rows),
        "group_peaks": next(
            (c.group_peak_memory_measure for c in rows if c.group_peak_memory_bytes), None
        ),
        "buckets": [{"i": b, "label": bucket_label(b)} for b in buckets],
        "bucket_rows": brows,
        "bucket_figure": figure,
    }


def _figures(run: Run, rows: list[GenerationRecord]) -> list[dict]:
    """Per suite and mode: TTFT p50 and TPOT p50 / p95 bars, one per cell."""
    figures = []
    for suite in run.suites:
        for mode in run.modes:
            cs = [c for c in rows if c.suite == suite and c.mode == mode]
            if not cs:
                continue
            labels = [run.label(c, suite=False) for c in cs]
            panels = [
                {
                    "title": "time to first token",
                    "xlabel": "seconds",
                    "labels": labels,
                    "values": [c.ttft_s_p50 for c in cs],
                    "value_label": "p50",
                },
                {
                    "title": "time per output token (TPOT), per request",
                    "xlabel": "seconds per token",
                    "labels": labels,
                    "values": [c.tpot_s.p50 if c.tpot_s else None for c in cs],
                    "upper": [c.tpot_s.p95 if c.tpot_s else None for c in cs],
                    "value_label": "p50",
                    "upper_label": "p95",
                },
            ]
            title = f"suite {suite}, {mode}"
            figure = plots.try_figure("latency", plots.hbars, panels, f"{title}: latency")
            if figure is not None:
                figures.append({"title": title, "figure": figure, "caption": run.caption(cs)})
    return figures


def bucket(n: int) -> int:
    for i, edge in enumerate(LENGTH_BUCKETS):
        if n <= edge:
            return i
    return len(LENGTH_BUCKETS)


def bucket_label(i: int) -> str:
    lo = 1 if i == 0 else LENGTH_BUCKETS[i - 1] + 1
    return f"{lo}–{LENGTH_BUCKETS[i]}" if i < len(LENGTH_BUCKETS) else f">{LENGTH_BUCKETS[-1]}"


def _bucket_rows(run: Run) -> list[dict]:
    """Per speculative cell and output-length bucket: Σ tokens / Σ seconds against the same
    for target-only, on the prompts both generated."""
    rows = []
    for c in run.spec:
        base = run.base_of(c)
        if base is None:
            continue
        mine, theirs = prompt_times(c), prompt_times(base)
        sums: dict[int, list] = {}  # bucket -> [tokens, seconds, base tokens, base seconds, n]
        for pid, (n, s, _) in mine.items():
            if pid not in theirs:
                continue
            bn, bs, _ = theirs[pid]
            a = sums.setdefault(bucket(n), [0, 0.0, 0, 0.0, 0])
            a[0] += n
            a[1] += s
            a[2] += bn
            a[3] += bs
            a[4] += 1
        if sums:
            cells = {
                i: {"speedup": (n / s) / (bn / bs) if s and bs and bn else None, "n": k}
                for i, (n, s, bn, bs, k) in sums.items()
            }
            rows.append({"label": run.label(c), "cells": cells})
    return rows


def _bucket_panel(rows: list[dict], buckets: list[int]) -> dict:
    return {
        "title": "speedup by output length",
        "xlabel": "output length bucket (tokens)",
        "ylabel": "speedup (×)",
        "series": [
            (
                r["label"],
                list(range(len(buckets))),
                [(r["cells"].get(b) or {}).get("speedup") for b in buckets],
                {},
            )
            for r in rows
        ],
        "xticks": list(range(len(buckets))),
        "xticklabels": [bucket_label(b) for b in buckets],
        "hline": 1.0,
    }
