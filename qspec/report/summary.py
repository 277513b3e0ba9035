"""The verdict as one paragraph of plain text, for the terminal at the end of a run."""

from __future__ import annotations

from pathlib import Path

from qspec.report.analysis import Run
from qspec.report.budget import Budget
from qspec.report.format import fmt, fmt_bytes, fmt_speedup
from qspec.report.pairings import Pairing
from qspec.report.sections import verdict


def _describe(p: Pairing) -> str:
    q = p.quality
    bits = [f"{fmt_speedup(p.speedup)} speedup", f"{fmt(p.tokens_per_s)} tok/s"]
    if p.weights is not None:
        bits.append(f"{fmt_bytes(p.weights)} weights")
    if q.ppl_delta_pct is not None:
        bits.append(f"perplexity {q.ppl_delta_pct:+.1f}%")
    if q.acc_delta_points is not None:
        bits.append(f"accuracy {q.acc_delta_points:+.1f} pts")
    return f"target {p.target} + draft {p.draft}, γ={p.gamma}, {p.mode} ({', '.join(bits)})"


def summary_text(run_dir: Path, budget: Budget | None = None) -> str:
    """One paragraph for the terminal: recommendation, fastest pairing, warnings."""
    run = Run(Path(run_dir), budget)
    v = verdict.build(run)
    b = run.budget
    parts = [
        f"qspec run {run.dir.name} ({v['status']}, {run.hardware_label}, "
        f"reference {run.reference or '?'})."
    ]
    budget_txt = (
        f"perplexity +{b.max_ppl_increase_pct:g}% "
        f"and accuracy -{b.max_accuracy_drop_points:g} points"
    )
    if v["recommended"]:
        parts.append(f"Recommended within {budget_txt}: {_describe(v['recommended'])}.")
        if v["slower"]:
            parts.append(
                "It is still slower than the target alone: on this machine, serve without a draft."
            )
    elif v["pairings"]:
        parts.append(f"No speculative pairing meets the budget ({budget_txt}).")
    else:
        parts.append("No speculative cell was measured successfully.")
    if v["fastest"] and not v["same"]:
        parts.append(f"Fastest overall: {_describe(v['fastest'])}.")
    if v["non_lossless"]:
        which = ", ".join(f"{n['target']}+{n['draft']}" for n in v["non_lossless"])
        parts.append(f"WARNING: speculative output is not lossless for {which}.")
    if v["n_failed"]:
        parts.append(f"{v['n_failed']} cell(s) failed or were unavailable.")
    if v["status"] not in ("complete",):
        parts.append(f"The run is {v['status']}: results are incomplete.")
    if run.is_cpu:
        parts.append("Timings on CPU are not representative of GPU serving.")
    # names come from results files: keep terminal control sequences out of the output
    return "".join(ch if ch.isprintable() else " " for ch in " ".join(parts))
