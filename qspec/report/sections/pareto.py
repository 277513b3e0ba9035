"""Speed, memory and quality: tokens/s against weights and against peak memory per mode,
coloured by the target's perplexity increase, with the Pareto front of each panel."""

from __future__ import annotations

from qspec.report import plots
from qspec.report.analysis import Run

MEASURES = (
    ("weights", "weights of target + draft (MiB)"),
    ("peak", "the cell's own peak memory (MiB)"),
)


def build(run: Run) -> dict:
    memory = {"weights": run.weights_total, "peak": lambda c: c.peak_memory_bytes}
    panels, fronts = [], []
    for mode in run.modes:
        for measure, xlabel in MEASURES:
            pts = _points(run, mode, memory[measure])
            if not pts:
                continue
            mark_front(pts)
            panels.append(
                {"title": f"{mode}: tokens/s vs {measure}", "xlabel": xlabel, "points": pts}
            )
            front = sorted((p for p in pts if p["front"]), key=lambda p: p["x"])
            fronts.append({"mode": mode, "measure": measure, "points": front})
    figure = None
    if panels:
        figure = plots.try_figure(
            "pareto",
            plots.pareto,
            panels,
            "target perplexity increase (%)",
            vmin=0.0,
            vmax=2 * run.budget.max_ppl_increase_pct,
        )
    return {
        "figure": figure,
        "fronts": fronts,
        "caption": run.caption(run.ok),
        "measure": next((c.peak_memory_measure for c in run.ok if c.peak_memory_measure), None),
    }


def _points(run: Run, mode: str, memory) -> list[dict]:
    pts = []
    for c in run.ok:
        if c.mode != mode:
            continue
        x, y = memory(c), c.tokens_per_s
        if x is None or y is None:
            continue
        vq = run.vq.get(c.target)
        pts.append(
            {
                "x": x / 1024**2,
                "y": y,
                "c": vq.ppl_delta_pct if vq else None,
                "kind": c.kind,
                "cell": c,
                "label": run.label(c),
            }
        )
    return pts


def mark_front(points: list[dict]) -> None:
    """Mark points no other point beats on both memory (lower) and tokens/s (higher)."""
    for p in points:
        p["front"] = not any(
            (o["x"] <= p["x"] and o["y"] >= p["y"]) and (o["x"] < p["x"] or o["y"] > p["y"])
            for o in points
            if o is not p
        )
