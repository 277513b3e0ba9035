"""Verdict: per decoding mode, every serving option (each target alone and each speculative
pairing) ranked by absolute tokens/s, the one to serve, and the warnings that qualify it (proxy
hardware, output that is not lossless, an incomplete run).

A speculative pairing is recommended only when its speedup's 95% interval lies entirely above 1
(an older run without intervals: the point estimate, labelled as such); otherwise the headline
is the best eligible target alone, with the best speculative option named second. Eligible:
the target's quality budget is not failed and the output is not shown to differ. The headline
goes to an option whose target is shown within budget; a faster one whose quality is only
inconclusive is named beside it (another run could fail it), never above it."""

from __future__ import annotations

from qspec.records import Kind
from qspec.report.analysis import Run
from qspec.report.budget import PASS, PPL_TEST, TASK_TEST
from qspec.report.format import fmt, fmt_bytes, num, text
from qspec.report.pairings import Pairing, pairings, ranking

EXACT_Z = 3.29  # two-sided p < 0.001: a peer's acceptance this far from what its p, q allow

SMALL_MODEL_BYTES = 2 * 1024**3


def build(run: Run) -> dict:
    pairs = pairings(run)
    modes = [_mode(run, m) for m in run.modes]
    modes = [m for m in modes if m["options"]]
    fastest = pairs[0] if pairs and pairs[0].tokens_per_s is not None else None
    return {
        "budget": run.budget,
        "modes": modes,
        "fastest": fastest,
        "pairings": pairs,
        "proxy": _proxy(run),
        "provenance": sorted({v.model_note for v in run.variants if v.model_note}),
        "status": text(run.info.status) or "unknown",
        "non_lossless": [
            {"target": t, "draft": d, "reasons": r} for (t, d), r in run.not_lossless.items()
        ],
        "hf_not_lossless": [
            run.label(c) for c in run.ok if c.kind == Kind.HF_ASSISTED and c.lossless is False
        ],
        "hf_not_exact": [
            f"{run.label(c)}: α {fmt(c.alpha_measured)} measured, {fmt(c.peer_alpha_exact)} allowed"
            for c in run.ok
            if c.kind == Kind.HF_ASSISTED and abs(num(c.peer_exact_z) or 0) > EXACT_Z
        ],
        "n_failed": sum(1 for c in run.cells if not c.ok),
        "caption": run.caption(run.spec),
        "tests": {"ppl": PPL_TEST, "task": TASK_TEST},
        "any_point": any(p.interval_missing for p in pairs),
    }


def _mode(run: Run, mode: str) -> dict:
    options = ranking(run, mode)
    eligible = [p for p in options if p.eligible]
    shown = [p for p in eligible if p.quality.verdict == PASS]
    unproven = None
    if shown:  # nothing shown within budget (no quality figures at all): rank what is eligible
        unproven = next((p for p in eligible if p.quality.verdict != PASS), None)
        if unproven is not None and options.index(unproven) > options.index(shown[0]):
            unproven = None  # slower than the headline's candidates anyway
        eligible = shown
    faster = [p for p in eligible if not p.alone and p.faster]
    best_alone = next((p for p in eligible if p.alone), None)
    best_spec = next((p for p in eligible if not p.alone), None)
    candidates = [p for p in eligible if p.alone or p.faster]
    if faster:
        head = candidates[0]
        second = faster[0] if head.alone else best_alone
    else:
        head, second = best_alone, best_spec
    return {
        "mode": mode,
        "options": options,
        "head": head,
        "second": second,
        "alone": head is not None and head.alone,
        "none_faster": not faster,
        "best_spec": best_spec,
        "samples": samples_text(samples(run, head)) if head else None,
        "point_only": head is not None and head.interval_missing,
        "unproven": unproven,
    }


def samples(run: Run, p: Pairing) -> dict:
    """How many samples stand behind an option: prompts, tokens, corpus positions, documents."""
    qs = [q for q in run.quality if q.variant == p.target and q.ok]
    ts = [t for t in run.tasks if t.variant == p.target and t.ok]
    docs = [c.n for c in p.quality.checks if c.unit == "documents" and c.n is not None]
    if not docs:
        docs = [t.n for t in ts if t.n]
    return {
        "prompts": p.speedup_pairs if p.speedup_pairs is not None else p.n_prompts,
        "tokens": p.tokens,
        "positions": sum(q.positions or 0 for q in qs) or None,
        "documents": sum(docs) or None,
    }


def samples_text(s: dict | None) -> str:
    if not s:
        return "no samples recorded"
    bits = []
    for key, what in (
        ("prompts", "prompts"),
        ("tokens", "generated tokens"),
        ("positions", "corpus positions (quality)"),
        ("documents", "task documents"),
    ):
        if s[key]:
            bits.append(f"{s[key]:,} {what}")
    return ", ".join(bits) or "no samples recorded"


def _proxy(run: Run) -> list[str]:
    """Why these numbers may not carry over to serving a large model on a GPU."""
    out = []
    if run.is_cpu:
        out.append(
            "Timings were measured on CPU and are not representative of GPU serving: "
            "treat speeds and speedups as a proxy; acceptance rates and quality carry over better."
        )
    ref_w = run.target_weights(run.reference) if run.reference else None
    if ref_w is not None and ref_w < SMALL_MODEL_BYTES:
        out.append(
            f"The target is a small model ({fmt_bytes(ref_w)} of weights at the reference "
            "precision): results are a proxy for the large models speculative decoding is used with."
        )
    return out
