"""γ sweep: τ and speedup against γ per pairing, measured beside both predictions, wherever a
pairing was measured at more than one γ (per suite and mode)."""

from __future__ import annotations

from qspec.records import GenerationRecord
from qspec.report import plots
from qspec.report.analysis import Run, order
from qspec.report.format import text
from qspec.report.sections.alpha import corpus_prediction


def _pair(c: GenerationRecord) -> str:
    return f"{c.target} + {text(c.draft)}"


def build(run: Run) -> list[dict]:
    sweeps = []
    for suite in run.suites:
        for mode in run.modes:
            cs = [c for c in run.spec if c.suite == suite and c.mode == mode]
            if len({c.gamma for c in cs}) >= 2:
                sweeps.append(_sweep(run, suite, mode, cs))
    return sweeps


def _sweep(run: Run, suite: str, mode: str, cs: list[GenerationRecord]) -> dict:
    series_tau, series_sp, table = [], [], []
    for i, p in enumerate(order([_pair(c) for c in cs], [])):
        pc = sorted((c for c in cs if _pair(c) == p), key=lambda c: c.gamma)
        xs = [c.gamma for c in pc]
        corpus = [corpus_prediction(run, c)["tau"] for c in pc]
        measured = {"colour": i, "group": p, "kind": "measured"}
        on_policy = {**measured, "kind": "predicted (on policy)", "ls": "--", "marker": "x"}
        on_corpus = {**measured, "kind": "predicted (corpus)", "ls": ":", "marker": "+"}
        series_tau.append((p, xs, [c.tau for c in pc], measured))
        series_tau.append((p, xs, [c.tau_predicted for c in pc], on_policy))
        if any(v is not None for v in corpus):
            series_tau.append((p, xs, corpus, on_corpus))
        series_sp.append((p, xs, [c.speedup for c in pc], measured))
        series_sp.append((p, xs, [c.speedup_predicted for c in pc], on_policy))
        table += [{"pair": p, "c": c, "corpus_tau": t} for c, t in zip(pc, corpus, strict=True)]
    gammas = sorted({c.gamma for c in cs})
    tau_panel = {
        "title": "τ vs γ",
        "xlabel": "γ (drafts per step)",
        "ylabel": "τ (tokens per target step)",
        "series": series_tau,
        "xticks": gammas,
    }
    speedup_panel = {
        "title": "speedup vs γ",
        "xlabel": "γ (drafts per step)",
        "ylabel": "speedup (×)",
        "series": series_sp,
        "xticks": gammas,
        "hline": 1.0,
    }
    figure = plots.try_figure(
        "gamma sweep", plots.lines, [tau_panel, speedup_panel], f"suite {suite}, {mode}: γ sweep"
    )
    return {
        "suite": suite,
        "mode": mode,
        "figure": figure,
        "table": table,
        "caption": run.caption(cs),
    }
