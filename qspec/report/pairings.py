"""Speculative pairings: the (target, draft, γ, mode) cells of all suites taken together, the
unit the verdict recommends, and the pairings whose output is not the target's own."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qspec.report.budget import VariantQuality, variant_quality
from qspec.report.format import fmt, text

if TYPE_CHECKING:
    from qspec.records import GenerationRecord
    from qspec.report.analysis import Run


@dataclass
class Pairing:
    target: str
    draft: str
    gamma: int
    mode: str
    label: str
    speedup: float | None  # geometric mean over suites
    tokens_per_s: float | None
    weights: float | None  # target + draft
    peak: float | None
    peak_measure: str | None
    alpha: float | None  # one suite only: an average over suites would hide the spread
    tau: float | None
    quality: VariantQuality  # of the target
    lossless: bool | None
    reasons: list[str]  # why it may not be recommended
    n_suites: int
    n_prompts: int
    tokens: int
    steps: int

    @property
    def eligible(self) -> bool:
        return not self.reasons


def geomean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def not_lossless(run: Run) -> dict[tuple[str, str], list[str]]:
    """(target, draft) -> reasons its speculative output differs from the target's own."""
    out = defaultdict(list)
    for c in run.spec:
        if c.mode == "greedy" and c.lossless is False:
            ids = c.lossless_mismatches
            what = f"greedy output differs from target-only at γ={c.gamma}"
            if run.multi_suite():
                what += f" on suite {c.suite}"
            if ids:
                what += f" ({len(ids)} prompt(s): {', '.join(ids[:5])})"
            out[(c.target, text(c.draft))].append(what)
    for t in run.task_lossless:
        if t.equal is False:
            out[(t.target, t.draft)].append(
                f"task {text(t.task)}: accuracy {fmt(t.accuracy_plain, 3)} plain "
                f"vs {fmt(t.accuracy_speculative, 3)} speculative"
            )
        elif t.outputs_identical is False:
            docs = t.mismatched_docs
            out[(t.target, t.draft)].append(
                f"task {text(t.task)}: generated answers differ"
                + (f" on {len(docs)} document(s)" if docs else "")
            )
    return dict(out)


def pairings(run: Run) -> list[Pairing]:
    """Every pairing, the highest measured speedup first."""
    groups = defaultdict(list)
    for c in run.spec:
        groups[(c.target, text(c.draft), c.gamma, c.mode)].append(c)
    out = [_pairing(run, *key, cs) for key, cs in groups.items()]
    out.sort(key=lambda p: -(p.speedup if p.speedup is not None else -1e9))
    return out


def _pairing(
    run: Run, target: str, draft: str, gamma: int, mode: str, cs: list[GenerationRecord]
) -> Pairing:
    speedup = geomean([c.speedup for c in cs])
    tok = sum(c.tokens or 0 for c in cs)
    sec = sum(c.seconds or 0 for c in cs)
    tps = tok / sec if tok and sec else geomean([c.tokens_per_s for c in cs])
    peaks = [c.peak_memory_bytes for c in cs if c.peak_memory_bytes is not None]
    vq = run.vq.get(target) or variant_quality(run, target)
    reasons = []
    if vq.verdict == "fail":
        reasons.append("target quality outside the budget: " + "; ".join(vq.reasons))
    elif vq.verdict == "unknown":
        reasons.append("target quality not measured")
    changed = (target, draft) in run.not_lossless
    if changed:
        reasons.append("output not lossless (see the warning above)")
    if speedup is None:
        reasons.append("no speedup measured (no target-only baseline)")
    return Pairing(
        target=target,
        draft=draft,
        gamma=gamma,
        mode=mode,
        label=f"{target} + {draft} γ={gamma} {mode}",
        speedup=speedup,
        tokens_per_s=tps,
        weights=run.weights_total(cs[0]),
        peak=max(peaks) if peaks else None,
        peak_measure=cs[0].peak_memory_measure,
        alpha=cs[0].alpha_measured if len(cs) == 1 else None,
        tau=cs[0].tau if len(cs) == 1 else None,
        quality=vq,
        lossless=False if changed else (True if all(c.lossless is True for c in cs) else None),
        reasons=reasons,
        n_suites=len(cs),
        n_prompts=sum(c.n_prompts or 0 for c in cs),
        tokens=tok,
        steps=sum(c.steps or 0 for c in cs),
    )
