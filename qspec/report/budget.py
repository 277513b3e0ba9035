"""The quality budget: how much a TARGET variant may lose against the reference, and whether
each variant stays within it. A pairing is only as good as its target's quality."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qspec.records import QualityRecord, TaskRecord

if TYPE_CHECKING:
    from qspec.report.analysis import Run


@dataclass
class Budget:
    """The quality a pairing's TARGET variant may give up against the reference."""

    max_ppl_increase_pct: float = 5.0
    max_accuracy_drop_points: float = 2.0


@dataclass
class VariantQuality:
    """pass / fail / unknown for one variant, with its worst perplexity and accuracy deltas."""

    verdict: str
    reasons: list[str] = field(default_factory=list)
    ppl_delta_pct: float | None = None
    acc_delta_points: float | None = None
    kl_mean: float | None = None
    top1: float | None = None


def is_reference(run: Run, variant: str | None) -> bool:
    return variant is not None and variant == run.reference


def _ref_quality(run: Run, suite: str) -> QualityRecord | None:
    return next((q for q in run.quality if q.suite == suite and is_reference(run, q.variant)), None)


def ppl_delta_pct(run: Run, q: QualityRecord) -> float | None:
    """Perplexity increase over the reference in percent: the stored ratio, else one computed
    from the reference's own record of the suite."""
    ratio = q.ppl_ratio
    if ratio is None:
        ref = _ref_quality(run, q.suite)
        rp = ref.ppl if ref else None
        ratio = q.ppl / rp if q.ppl is not None and rp else None
    if ratio is None and is_reference(run, q.variant) and q.ppl:
        ratio = 1.0
    return None if ratio is None else 100 * (ratio - 1)


def task_delta_points(run: Run, t: TaskRecord) -> float | None:
    """Accuracy change against the reference on the same task and metric, in points."""
    if is_reference(run, t.variant):
        return 0.0 if t.value is not None else None
    for r in run.tasks:
        if is_reference(run, r.variant) and (r.suite, r.task, r.metric) == (
            t.suite,
            t.task,
            t.metric,
        ):
            if t.value is None or r.value is None:
                return None
            scale = 100 if max(abs(t.value), abs(r.value)) <= 1 else 1
            return (t.value - r.value) * scale
    return None


def variant_quality(run: Run, v: str) -> VariantQuality:
    b = run.budget
    ppl = [ppl_delta_pct(run, q) for q in run.quality if q.variant == v and q.ok]
    ppl = [x for x in ppl if x is not None]
    acc = [task_delta_points(run, t) for t in run.tasks if t.variant == v and t.ok]
    acc = [x for x in acc if x is not None]
    worst_ppl = max(ppl) if ppl else None
    worst_acc = min(acc) if acc else None
    fails = []
    if worst_ppl is not None and worst_ppl > b.max_ppl_increase_pct:
        fails.append(f"perplexity +{worst_ppl:.1f}% > {b.max_ppl_increase_pct:g}% allowed")
    if worst_acc is not None and -worst_acc > b.max_accuracy_drop_points:
        fails.append(
            f"accuracy {worst_acc:+.1f} points, "
            f"more than the {b.max_accuracy_drop_points:g} allowed"
        )
    qs = [q for q in run.quality if q.variant == v]
    kl = [q.kl_mean for q in qs if q.kl_mean is not None]
    top1 = [q.top1 for q in qs if q.top1 is not None]
    if fails:
        verdict, reasons = "fail", fails
    elif v == run.reference:
        verdict, reasons = "pass", ["the reference variant"]
    elif ppl or acc:
        verdict, reasons = "pass", []
        if not ppl:
            reasons.append("perplexity not measured")
        if not acc:
            reasons.append("task accuracy not measured")
    else:
        verdict, reasons = "unknown", ["quality not measured for this variant"]
    return VariantQuality(
        verdict=verdict,
        reasons=reasons,
        ppl_delta_pct=worst_ppl,
        acc_delta_points=worst_acc,
        kl_mean=max(kl) if kl else None,
        top1=min(top1) if top1 else None,
    )
