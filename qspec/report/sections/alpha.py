"""α three ways for each speculative cell: predicted on the suite corpus (the pair screen),
predicted on policy (on the text generation visits), and measured. The gap between them says
whether a cheap screen can stand in for a generation run."""

from __future__ import annotations

from qspec.records import GenerationRecord, PairScreenRecord
from qspec.report import plots
from qspec.report.analysis import Run


def screen_for(run: Run, c: GenerationRecord) -> PairScreenRecord | None:
    for s in run.screens:
        if (s.suite, s.target, s.draft) == (c.suite, c.target, c.draft):
            return s
    return None


def corpus_prediction(run: Run, c: GenerationRecord) -> dict:
    """The screen's α for the cell's mode and its expected τ and acceptance rate at the cell's γ."""
    s = screen_for(run, c)
    if s is None:
        return {"alpha": None, "se": None, "positions": None, "tau": None, "rate": None}
    at = s.predicted.get(str(c.gamma))
    tau = rate = None
    if at is not None:
        tau, rate = at.tau, at.acceptance_rate  # greedy; older screens predicted only these
        if c.mode == "sample":
            tau = at.tau_sample if at.tau_sample is not None else tau
            rate = at.acceptance_rate_sample if at.acceptance_rate_sample is not None else rate
    sample = c.mode == "sample"
    return {
        "alpha": s.alpha_predicted_sample if sample else s.alpha_predicted_greedy,
        "se": s.alpha_predicted_sample_se if sample else s.alpha_predicted_greedy_se,
        "positions": s.positions,
        "tau": tau,
        "rate": rate,
    }


def build(run: Run) -> dict:
    alphas = [
        {
            "c": c,
            "label": run.label(c),
            "corpus": corpus_prediction(run, c),
            "on_policy": c.alpha_predicted,
            "on_policy_n": c.alpha_predicted_positions,
            "on_policy_what": c.alpha_predicted_on,
            "on_policy_se": c.alpha_predicted_se,
            "measured": c.alpha_measured,
            "measured_ci": c.alpha_measured_ci95,
            "tested": c.tested,
            "gap": c.alpha_gap,
            "agrees": c.alpha_agrees,
        }
        for c in run.spec
    ]
    figure = None
    if alphas:
        figure = plots.try_figure(
            "alpha",
            plots.grouped_bars,
            [
                {
                    "title": "α: predicted on corpus, predicted on policy, measured",
                    "ylabel": "α (per-token acceptance)",
                    "categories": [a["label"] for a in alphas],
                    "series": [
                        ("predicted (corpus)", [a["corpus"]["alpha"] for a in alphas]),
                        ("predicted (on policy)", [a["on_policy"] for a in alphas]),
                        ("measured", [a["measured"] for a in alphas]),
                    ],
                    "ylim": (0, 1.05),
                }
            ],
        )
    return {"alphas": alphas, "alpha_figure": figure, "alpha_caption": run.caption(run.spec)}
