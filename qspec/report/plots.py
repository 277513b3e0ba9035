"""Matplotlib figures for the report, each returned as a base64 ``data:image/svg+xml`` URI.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, so no global figure registry
to leak into and no interactive backend; saving goes through Agg/SVG canvases). Labels may hold
user strings (model, suite and precision names): mathtext parsing is switched off so a ``$``
in a name is printed rather than parsed, and the SVG is embedded through ``<img src="data:...">``
so nothing in it can become markup of the page.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from collections.abc import Callable, Sequence

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

RC = {
    "svg.fonttype": "path",  # glyphs as paths: renders the same without any font on the viewer
    "svg.hashsalt": "qspec",  # deterministic ids
    "text.parse_math": False,
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
}
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
MAX_LABEL = 40

log = logging.getLogger("qspec.report")


def try_figure(what: str, draw: Callable[..., str], *args, **kwargs) -> str | None:
    """draw(*args, **kwargs), or None with a warning when it fails: a figure only repeats what its
    table shows, so a plotting error must not cost the report its section."""
    try:
        return draw(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - any matplotlib failure; the table still stands
        log.warning("%s figure failed: %s", what, err)
        return None


def label(text, limit: int = MAX_LABEL) -> str:
    """A user string made short and single-line for an axis label."""
    s = "—" if text is None else " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E501


def new_figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(RC):
        return Figure(figsize=(width, height), layout="constrained")


def to_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    fig.clear()
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heatmaps(panels: list[dict], rows: Sequence[str], cols: Sequence[str], title: str) -> str:
    """Side-by-side annotated heatmaps; panel: {title, values (rows x cols, None = empty),
    fmt (callable), cmap, vmin, vmax, notes (optional rows x cols extra text), uncertain
    (optional {(row, col): why}: drawn hatched, with the why)}."""
    with matplotlib.rc_context(RC):
        n = len(panels)
        rows, cols = [label(r, 24) for r in rows], [label(c, 24) for c in cols]
        w = max(2.4, 0.9 * len(cols) + 1.3 + 0.055 * max(map(len, rows), default=0))
        h = max(1.9, 0.5 * len(rows) + 1.3 + 0.04 * max(map(len, cols), default=0))
        fig = new_figure(min(16.0, w * n), h)
        axes = fig.subplots(1, n, squeeze=False)[0]
        for ax, p in zip(axes, panels, strict=True):
            vals = [[v if _finite(v) else math.nan for v in row] for row in p["values"]]
            cmap = matplotlib.colormaps[p.get("cmap", "viridis")].with_extremes(bad="#eeeeee")
            im = ax.imshow(vals, cmap=cmap, vmin=p.get("vmin"), vmax=p.get("vmax"), aspect="auto")
            ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
            ax.set_yticks(range(len(rows)), rows)
            ax.set_xlabel("draft")
            ax.set_ylabel("target")
            ax.set_title(p["title"])
            for s in ax.spines.values():
                s.set_visible(False)
            lo, hi = im.get_clim()
            for i, row in enumerate(vals):
                for j, v in enumerate(row):
                    note = (p.get("notes") or [[None] * len(cols)] * len(rows))[i][j]
                    if math.isnan(v):
                        ax.text(j, i, note or "—", ha="center", va="center", color="#777777")
                        continue
                    frac = (v - lo) / (hi - lo) if hi > lo else 0.5
                    colour = "white" if frac < 0.45 else "black"
                    text = p["fmt"](v) + (f"\n{note}" if note else "")
                    few = (p.get("uncertain") or {}).get((i, j))
                    if few:  # hatched, with its n: a figure on few samples must not look sure
                        ax.add_patch(
                            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                      edgecolor="#444444", lw=0, alpha=0.6)
                        )  # fmt: skip
                        text += f"\n({few})"
                    ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
        fig.suptitle(label(title, 100))
        return to_uri(fig)


def pareto(
    panels: list[dict], colour_label: str, vmin: float = 0.0, vmax: float | None = None
) -> str:
    """panel: {title, xlabel, points: [{x, y, c, kind, front}]}; front points joined by a step line."""
    markers = {"target_only": "s", "speculative": "o", "hf_assisted": "^", "hf_target_only": "v"}
    with matplotlib.rc_context(RC):
        cols = min(2, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig = new_figure(5.6 * cols, 3.6 * nrows)
        axes = fig.subplots(nrows, cols, squeeze=False).ravel()
        cvals = [p["c"] for pan in panels for p in pan["points"] if _finite(p["c"])]
        vmin = min([vmin, *cvals])
        vmax = max([vmax if vmax is not None else vmin + 1.0, *cvals])
        if vmax <= vmin:
            vmax = vmin + 1.0
        cmap = matplotlib.colormaps["RdYlGn_r"]
        norm = matplotlib.colors.Normalize(vmin, vmax)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        for ax, pan in zip(axes, panels, strict=False):
            pts = [p for p in pan["points"] if _finite(p["x"]) and _finite(p["y"])]
            for kind, m in markers.items():
                sel = [p for p in pts if p["kind"] == kind]
                if not sel:
                    continue
                colours = [cmap(norm(p["c"])) if _finite(p["c"]) else "#bbbbbb" for p in sel]
                ax.scatter(
                    [p["x"] for p in sel],
                    [p["y"] for p in sel],
                    c=colours,
                    marker=m,
                    s=46,
                    edgecolors="black",
                    linewidths=0.5,
                    label=kind.replace("_", " "),
                    zorder=3,
                )
            front = sorted((p for p in pts if p.get("front")), key=lambda p: p["x"])
            if front:
                xs, ys = [front[0]["x"]], [front[0]["y"]]
                for p in front[1:]:
                    xs += [p["x"], p["x"]]
                    ys += [ys[-1], p["y"]]
                ax.plot(xs, ys, color="#333333", lw=1.2, ls="--", zorder=2, label="Pareto front")
            ax.set_title(label(pan["title"], 60))
            ax.set_xlabel(pan["xlabel"])
            ax.set_ylabel("tokens/s")
            ax.grid(alpha=0.3)
            if pts:
                ax.legend(fontsize=7, loc="best")
        sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=list(axes[: len(panels)]), label=colour_label, shrink=0.7, aspect=30)
        return to_uri(fig)


def grouped_bars(
    panels: list[dict],
    title: str | None = None,
) -> str:
    """panel: {title, xlabel, ylabel, categories, series: [(name, values)], ylim, ann (optional
    per-series list of strings printed above bars)}."""
    with matplotlib.rc_context(RC):
        n = len(panels)
        width = sum(
            max(4.2, 0.3 * len(p["categories"]) * max(1, len(p["series"])) + 1.5) for p in panels
        )
        n_series = max(len(p["series"]) for p in panels)
        fig = new_figure(min(15.0, width), 3.4 + 0.17 * math.ceil(n_series / 4))
        axes = fig.subplots(1, n, squeeze=False)[0]
        for ax, p in zip(axes, panels, strict=True):
            k = max(1, len(p["series"]))
            bw = 0.8 / k
            for si, (name, values) in enumerate(p["series"]):
                xs = [i - 0.4 + bw * (si + 0.5) for i in range(len(p["categories"]))]
                ys = [v if _finite(v) else 0.0 for v in values]
                bars = ax.bar(xs, ys, bw, label=label(name), color=PALETTE[si % len(PALETTE)])
                ann = (p.get("ann") or [None] * k)[si]
                if ann:
                    for b, a in zip(bars, ann, strict=False):
                        if a:
                            ax.annotate(
                                a,
                                (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center",
                                va="bottom",
                                fontsize=6.5,
                                color="#444444",
                            )
            names = [label(c) for c in p["categories"]]
            long = sum(len(c) for c in names) > 50
            ax.set_xticks(
                range(len(names)),
                names,
                rotation=25 if long else 0,
                ha="right" if long else "center",
            )
            ax.set_title(p["title"])
            ax.set_xlabel(p.get("xlabel", ""))
            ax.set_ylabel(p.get("ylabel", ""))
            if p.get("ylim"):
                ax.set_ylim(*p["ylim"])
            ax.grid(axis="y", alpha=0.3)
        if title:
            fig.suptitle(label(title, 100))
        _figure_legend(fig, axes)
        return to_uri(fig)


def _figure_legend(fig: Figure, axes, handles=None, labels=None) -> None:
    """One legend under all panels (never over data); entries with the same label once."""
    if handles is None:
        handles, labels = [], []
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels and not lab.startswith("_"):
                    handles.append(h)
                    labels.append(lab)
    if not handles:
        return
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=min(4, len(handles)),
        fontsize=7,
        frameon=False,
    )


def lines(panels: list[dict], title: str | None = None) -> str:
    """panel: {title, xlabel, ylabel, series: [(name, xs, ys, style)], hline (optional y)}."""
    with matplotlib.rc_context(RC):
        n = len(panels)
        n_series = max(len(p["series"]) for p in panels)
        fig = new_figure(min(15.0, 5.2 * n), 3.2 + 0.17 * math.ceil(n_series / 4))
        axes = fig.subplots(1, n, squeeze=False)[0]
        for ax, p in zip(axes, panels, strict=True):
            for si, (name, xs, ys, style) in enumerate(p["series"]):
                pts = [(x, y) for x, y in zip(xs, ys, strict=True) if _finite(x) and _finite(y)]
                if not pts:
                    continue
                colour = PALETTE[(style.get("colour", si)) % len(PALETTE)]
                marker = style.get("marker", "os^Dv<>ph*"[(si // len(PALETTE)) % 10])
                ax.plot(
                    [a for a, _ in pts],
                    [b for _, b in pts],
                    marker=marker,
                    ls=style.get("ls", "-"),
                    color=colour,
                    label=label(name),
                    ms=4,
                )
            if p.get("hline") is not None:
                ax.axhline(p["hline"], color="#555555", lw=0.8, ls=":")
            if p.get("xticks"):
                names = p.get("xticklabels")
                ax.set_xticks(p["xticks"], [label(n) for n in names] if names else None)
            ax.set_title(p["title"])
            ax.set_xlabel(p.get("xlabel", ""))
            ax.set_ylabel(p.get("ylabel", ""))
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(label(title, 100))
        styled = [st for p in panels for *_, st in p["series"]]
        if styled and all("group" in st and "kind" in st for st in styled):
            # colour = group (a pairing), line style = kind (measured / predicted): a compact key
            handles, labels = [], []
            for st in styled:
                if label(st["group"]) not in labels:
                    colour = PALETTE[st.get("colour", 0) % len(PALETTE)]
                    handles.append(Line2D([], [], color=colour, lw=2))
                    labels.append(label(st["group"]))
            for st in styled:
                if st["kind"] not in labels:
                    handles.append(
                        Line2D(
                            [],
                            [],
                            color="#333333",
                            ls=st.get("ls", "-"),
                            marker=st.get("marker", "o"),
                            ms=4,
                        )
                    )
                    labels.append(st["kind"])
            _figure_legend(fig, axes, handles, labels)
        else:
            _figure_legend(fig, axes)
        return to_uri(fig)


def hbars(panels: list[dict], title: str | None = None) -> str:
    """Horizontal bars with an optional upper marker; panel: {title, xlabel, labels, values,
    upper (optional, e.g. p95), upper_label, vline (optional x of a bound), vline_label}."""
    with matplotlib.rc_context(RC):
        n = len(panels)
        rows = max(len(p["labels"]) for p in panels)
        longest = max((len(label(x)) for p in panels for x in p["labels"]), default=0)
        fig = new_figure(min(15.0, (3.2 + 0.065 * longest) * n), 0.9 + 0.26 * rows)
        axes = fig.subplots(1, n, squeeze=False)[0]
        for ax, p in zip(axes, panels, strict=True):
            ys = range(len(p["labels"]))
            vals = [v if _finite(v) else 0.0 for v in p["values"]]
            ax.barh(list(ys), vals, color=PALETTE[0], label=p.get("value_label", "p50"))
            if p.get("upper"):
                up = [(y, u) for y, u in zip(ys, p["upper"], strict=True) if _finite(u)]
                if up:
                    ax.scatter(
                        [u for _, u in up],
                        [y for y, _ in up],
                        marker="|",
                        s=120,
                        color=PALETTE[3],
                        label=p.get("upper_label", "p95"),
                        zorder=3,
                    )
            if _finite(p.get("vline")):
                ax.axvline(p["vline"], color="#555555", lw=1.0, ls="--", label=p.get("vline_label"))
            ax.set_yticks(list(ys), [label(s) for s in p["labels"]])
            ax.invert_yaxis()
            ax.set_title(p["title"])
            ax.set_xlabel(p.get("xlabel", ""))
            ax.grid(axis="x", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        if title:
            fig.suptitle(label(title, 100))
        return to_uri(fig)
