"""The verdict as one paragraph of plain text, for the terminal at the end of a run: the same
logic as the page's verdict (sections/verdict.py)."""

from __future__ import annotations

from pathlib import Path

from qspec.report.analysis import Run
from qspec.report.budget import Budget
from qspec.report.format import fmt, fmt_bytes, fmt_ci, fmt_speedup
from qspec.report.pairings import Pairing
from qspec.report.sections import served_engine, verdict


def _describe(p: Pairing) -> str:
    q = p.quality
    bits = [f"{fmt(p.tokens_per_s)} tok/s"]
    if not p.alone:
        sp = f"{fmt_speedup(p.speedup)} speedup ({fmt_ci(p.speedup_ci95, style='x')}"
        sp += f", n = {p.speedup_pairs} prompts)" if p.speedup_pairs is not None else ")"
        bits.insert(0, sp)
    if p.weights is not None:
        bits.append(f"{fmt_bytes(p.weights)} weights")
    if q.ppl_delta_pct is not None:
        bits.append(f"perplexity {q.ppl_delta_pct:+.1f}%")
    if q.acc_delta_points is not None:
        bits.append(f"accuracy {q.acc_delta_points:+.1f} pts")
    bits.append(f"quality {q.label}")
    if p.alone:
        return f"target {p.target} alone, {p.mode} ({', '.join(bits)})"
    length = "" if p.draft_length == "fixed" else f", {p.draft_length} draft length"
    return f"target {p.target} + draft {p.draft}, γ={p.gamma}{length}, {p.mode} ({', '.join(bits)})"


def not_lossless_line(run: Run, pairs: list[dict]) -> str:
    """Which pairings are not lossless, and whether their targets explain it (batch invariance)."""
    variant = {v.precision: v.batch_invariant for v in run.variants if v.ok}
    shown = ", ".join(f"{n['target']}+{n['draft']}" for n in pairs[:4])
    shown += f" and {len(pairs) - 4} more" if len(pairs) > 4 else ""
    suspect = [f"{n['target']}+{n['draft']}" for n in pairs if variant.get(n["target"]) is True]
    if suspect:
        return f"WARNING: not lossless: {shown}; on batch-invariant targets: {', '.join(suspect)}."
    if any(variant.get(n["target"]) is None for n in pairs):
        return f"Not lossless: {shown}; their targets' batch invariance was not measured."
    targets = ", ".join(dict.fromkeys(n["target"] for n in pairs))
    return (
        f"Not lossless: {shown}; expected, their targets ({targets}) are not batch-invariant "
        "(one k-token forward differs from k one-token forwards): see Batch invariance."
    )


def served_lines(run: Run) -> list[str]:
    """Per mode, what to serve in vLLM at each concurrency level (sections/serving.py)."""
    out = []
    for mode in served_engine.MODES:
        levels = served_engine.recommend(run.serving, mode)
        if not levels:
            continue
        said = []
        for rec in levels:
            b = rec["best"]
            if b is None:
                said.append(f"at {rec['concurrency']}: nothing measured")
            elif b.draft is None:
                said.append(f"at {rec['concurrency']}: {b.target} alone")
            else:
                ci = fmt_ci(b.speedup_ci95, style="x")
                said.append(
                    f"at {rec['concurrency']}: {b.target}+{b.draft} γ={b.gamma} "
                    f"({fmt_speedup(b.speedup)}, {ci}, n = {b.speedup_pairs} repeats)"
                )
        out.append(f"Served by vLLM, {mode}, per concurrent requests: {'; '.join(said)}.")
    return out


def summary_text(run_dir: Path, budget: Budget | None = None) -> str:
    """One paragraph for the terminal: per mode the option to serve, warnings."""
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
    if not v["pairings"]:
        parts.append("No speculative cell was measured successfully.")
    for m in v["modes"]:
        head, second = m["head"], m["second"]
        if head is None:
            parts.append(f"{m['mode'].capitalize()}: no speculative pairing meets the budget.")
            continue
        if m["alone"]:
            why = (
                "no eligible speculative pairing is shown faster (no speedup interval above 1)"
                if m["none_faster"]
                else "faster than every pairing shown faster than its own target"
            )
            parts.append(
                f"{m['mode'].capitalize()}: serve {_describe(head)} ({why}; budget {budget_txt})."
            )
            if second is not None:
                parts.append(f"Best speculative option: {_describe(second)}.")
        else:
            point = " (point estimate only: no interval recorded)" if m["point_only"] else ""
            parts.append(
                f"{m['mode'].capitalize()}: recommended within {budget_txt}: "
                f"{_describe(head)}{point}."
            )
        if m["unproven"] is not None:
            u = m["unproven"]
            parts.append(
                f"Faster but quality {u.quality.label} (not shown within budget): {_describe(u)}."
            )
        parts.append(f"Behind it: {m['samples']}.")
    parts += served_lines(run)
    if v["non_lossless"]:
        parts.append(not_lossless_line(run, v["non_lossless"]))
    if v["n_failed"]:
        parts.append(f"{v['n_failed']} cell(s) failed or were unavailable.")
    if v["status"] not in ("complete",):
        parts.append(f"The run is {v['status']}: results are incomplete.")
    if run.is_cpu:
        parts.append("Timings on CPU are not representative of GPU serving.")
    # one line per statement; names come from results files: no terminal control sequences
    return "\n".join("".join(ch if ch.isprintable() else " " for ch in p) for p in parts)
