"""The verdict as one paragraph of plain text, for the terminal at the end of a run: the same
logic as the page's verdict (sections/verdict.py)."""

from __future__ import annotations

from pathlib import Path

from qspec.report.analysis import Run
from qspec.report.budget import Budget
from qspec.report.format import fmt, fmt_ci, fmt_speedup
from qspec.report.pairings import Pairing
from qspec.report.sections import served_engine, verdict


def _describe(p: Pairing) -> str:
    """One option in a few words: the pairing, its speed, and its quality only where it is
    not within budget (the budget is said once, in the first line)."""
    if p.alone:
        name = f"{p.target} alone"
    else:
        length = "" if p.draft_length == "fixed" else f", {p.draft_length} length"
        name = f"{p.target}+{p.draft} γ={p.gamma}{length}"
    bits = [f"{fmt(p.tokens_per_s)} tok/s"]
    if not p.alone:
        n = f", n={p.speedup_pairs}" if p.speedup_pairs is not None else ""
        ci = fmt_ci(p.speedup_ci95, style="x").replace("95% CI ", "")
        bits.insert(0, f"{fmt_speedup(p.speedup)} ({ci}{n})")
    if p.quality.verdict != "pass":
        bits.append(f"quality {p.quality.label}")
    return f"{name}, {', '.join(bits)}"


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
    return f"Not lossless: {shown}; expected: their targets are not batch-invariant."


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
                said.append(f"c={rec['concurrency']} nothing measured")
            elif b.draft is None:
                said.append(f"c={rec['concurrency']} {b.target} alone")
            else:
                ci = fmt_ci(b.speedup_ci95, style="x").replace("95% CI ", "")
                said.append(
                    f"c={rec['concurrency']} {b.target}+{b.draft} γ={b.gamma} "
                    f"{fmt_speedup(b.speedup)} ({ci}, n={b.speedup_pairs} repeats)"
                )
        out.append(f"vLLM, {mode}: {'; '.join(said)}.")
    return out


def summary_text(run_dir: Path, budget: Budget | None = None) -> str:
    """A few lines for the terminal (at most 900 characters as printed): per mode the option
    to serve and the best speculative one, what vLLM serves best, warnings. The report keeps
    the long form and the reasons."""
    run = Run(Path(run_dir), budget)
    v = verdict.build(run)
    b = run.budget
    parts = [
        f"qspec run {run.dir.name} ({v['status']}, {run.hardware_label}; reference "
        f"{run.reference or '?'}; budget perplexity +{b.max_ppl_increase_pct:g}%, "
        f"accuracy -{b.max_accuracy_drop_points:g} pts)."
    ]
    if not v["pairings"]:
        parts.append("No speculative cell was measured successfully.")
    for m in v["modes"]:
        head, second, mode = m["head"], m["second"], m["mode"].capitalize()
        if head is None:
            parts.append(f"{mode}: no speculative pairing meets the budget.")
            continue
        if m["alone"]:
            why = "none shown faster" if m["none_faster"] else "faster than every pairing"
            line = f"{mode}: serve {_describe(head)} ({why})"
            if second is not None:
                line += f"; best speculative: {_describe(second)}"
        else:
            point = ", point estimate only" if m["point_only"] else ""
            line = f"{mode}: recommended {_describe(head)}{point}"
        parts.append(line + ".")
        if m["unproven"] is not None:
            parts.append(f"Faster, quality not shown within budget: {_describe(m['unproven'])}.")
    parts += served_lines(run)
    if v["non_lossless"]:
        parts.append(not_lossless_line(run, v["non_lossless"]))
    tail = []
    if v["n_failed"]:
        tail.append(f"{v['n_failed']} cell(s) failed or unavailable")
    if v["status"] not in ("complete",):
        tail.append(f"the run is {v['status']}: results are incomplete")
    if run.is_cpu:
        tail.append("CPU timings are not GPU serving figures")
    if tail:
        said = "; ".join(tail)
        parts.append(said[0].upper() + said[1:] + ".")
    # one line per statement; names come from results files: no terminal control sequences
    return "\n".join("".join(ch if ch.isprintable() else " " for ch in p) for p in parts)
