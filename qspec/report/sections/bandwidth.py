"""Bandwidth roofline: each target forward's achieved weight-read bandwidth (as measure/roofline.py
stored it in the record) against the copy bandwidth run.json measured: how close each
precision gets to the memory bound that speculation exploits."""

from __future__ import annotations

from qspec.records import GenerationRecord, Kind
from qspec.report import plots
from qspec.report.analysis import Run, pos
from qspec.report.format import num, text

MAX_VERIFY_ROWS = 12  # above this the table shows one decoding mode's verify rows
MAX_FIGURE_ROWS = 30  # a taller bar chart adds nothing the table lacks


def bandwidth(run: Run) -> dict | None:
    """run.json's copy-bandwidth measurement, or None for runs that did not measure it."""
    bw = run.info.memory_bandwidth
    if not isinstance(bw, dict) or num(bw.get("copy_gbps")) is None:
        return None
    device = text(bw.get("device")).lower()
    method = text(bw.get("method")).strip()
    if method and method[-1] not in ".!?":
        method += "."  # shown as a sentence
    return {
        "gbps": num(bw["copy_gbps"]),
        "buffer_bytes": num(bw.get("buffer_bytes")),
        "samples": num(bw.get("samples")),
        "device": device or None,
        "method": method or None,
    }


def _row(c: GenerationRecord) -> dict | None:
    r = c.roofline
    if r is None:
        return None
    verify = r.kind == "verify"
    return {
        "c": c,
        "suite": c.suite,
        "target": c.target,
        "step": r.kind,
        "draft": text(c.draft) if verify else None,
        "gamma": c.gamma if verify else None,
        "mode": c.mode,
        "bytes": r.bytes_per_step,
        "step_s": r.step_s_p50,
        "samples": r.step_samples,
        "achieved": r.achieved_gbps,
        "bandwidth": r.bandwidth_gbps,
        "fraction": r.fraction,
    }


def _one_mode(run: Run, verify: list[dict]) -> tuple[list[dict], int, str | None]:
    """A long verify table keeps one mode: the (γ+1)-token forward is the same in every mode."""
    if len(verify) <= MAX_VERIFY_ROWS:
        return verify, 0, None
    modes = [m for m in run.modes if any(r["mode"] == m for r in verify)]
    shown = "greedy" if "greedy" in modes else modes[0]
    kept = [r for r in verify if r["mode"] == shown]
    return kept, len(verify) - len(kept), shown


def build(run: Run) -> dict:
    bw = bandwidth(run)
    copy_gbps = bw["gbps"] if bw else None
    cells = [c for c in run.ok if c.kind in (Kind.TARGET_ONLY, Kind.SPECULATIVE)]
    rows = [r for r in map(_row, cells) if r is not None]
    verify, omitted, shown_mode = _one_mode(run, [r for r in rows if r["step"] == "verify"])
    rows = sorted(
        [r for r in rows if r["step"] != "verify"] + verify,
        key=lambda r: (
            pos(run.suites, r["suite"]),
            pos(run.targets, r["target"]),
            r["step"] == "verify",
            pos(run.modes, r["mode"]),
            r["gamma"] or 0,
            pos(run.drafts, r["draft"]),
        ),
    )
    multi = run.multi_suite()
    for r in rows:
        bits = [r["target"], r["step"]]
        if r["step"] == "verify":
            bits.append(f"{r['draft']} γ={r['gamma']}")
        bits.append(r["mode"])
        r["label"] = (f"[{r['suite']}] " if multi else "") + " ".join(bits)
    figure = None
    if rows and len(rows) <= MAX_FIGURE_ROWS:
        panel = {
            "title": "achieved GB/s per forward",
            "xlabel": "GB/s (weights bytes ÷ median step time)",
            "labels": [r["label"] for r in rows],
            "values": [r["achieved"] for r in rows],
            "value_label": "achieved",
            "vline": copy_gbps,
            "vline_label": "measured copy bandwidth",
        }
        figure = plots.try_figure("roofline", plots.hbars, [panel])
    bandwidths = sorted({round(r["bandwidth"], 1) for r in rows})
    device = bw["device"] if bw and bw["device"] else None
    return {
        "bandwidth": bw,
        "rows": rows,
        "figure": figure,
        "omitted": omitted,
        "shown_mode": shown_mode,
        "multi_suite": multi,
        "other_bandwidths": [
            b for b in bandwidths if copy_gbps is None or abs(b - copy_gbps) > 0.05
        ],
        "cpu": device == "cpu" if device else run.is_cpu,
        "caption": run.caption([r["c"] for r in rows]),
    }
