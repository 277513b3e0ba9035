"""The quality budget: how much a TARGET variant may lose against the reference, and whether
each variant stays within it. A pairing is only as good as its target's quality.

A budget is FAILED only when the loss is significant, WITHIN when the 95% interval rules out a
loss beyond the budget, and otherwise inconclusive (with the sample size that was not enough):

- perplexity: the paired 95% interval of PPL(variant) / PPL(reference) over the same positions
  (llama.cpp's ln(PPL(Q)/PPL(base)) ± 1.96 SE). Failed when its lower end lies above
  1 + max_ppl_increase_pct / 100, within when its upper end lies at or below that.
- task accuracy: per-document paired deltas against the reference (stats.paired_delta, in
  points). Failed when the drop is significant (t interval below 0 and a sign test at 5%) and
  its mean exceeds the budget; within when the interval's lower end is >= -budget.

Older runs without these fields fall back to the point comparison, labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from qspec.measure.stats import paired_delta
from qspec.records import QualityRecord, TaskRecord
from qspec.report.format import interval

PASS, FAIL, INCONCLUSIVE, UNKNOWN = "pass", "fail", "inconclusive", "unknown"
PPL_TEST = (
    "paired 95% interval of the perplexity ratio over the same positions "
    "(exp(mean ± 1.96 SE) of the per-token ln-probability differences)"
)
TASK_TEST = (
    "per-document paired deltas against the reference: 95% t interval of the mean delta, "
    "and an exact two-sided sign test at 5% on the documents that changed"
)
POINT_TEST = "point comparison (no interval recorded by this run)"


@dataclass
class Budget:
    """The quality a pairing's TARGET variant may give up against the reference."""

    max_ppl_increase_pct: float = 5.0
    max_accuracy_drop_points: float = 2.0


class Run(Protocol):
    """What the budget reads of a run (analysis.Run has it): no import back up to it."""

    budget: Budget
    reference: str | None
    quality: list[QualityRecord]
    tasks: list[TaskRecord]


@dataclass
class Check:
    """One figure of one variant against the budget: perplexity on a suite, or one task."""

    what: str  # "perplexity" or the task name
    suite: str
    verdict: str  # pass (within budget), fail, inconclusive, unknown
    delta: float | None  # % for perplexity, points for a task
    ci: tuple[float, float] | None  # same unit as delta
    n: int | None
    unit: str  # "positions" or "documents"
    test: str
    p: float | None = None  # sign test p (tasks)
    worse: int | None = None
    better: int | None = None

    @property
    def label(self) -> str:
        if self.verdict == FAIL:
            return "FAILED"
        if self.verdict == PASS:
            return "within budget"
        if self.verdict == INCONCLUSIVE:
            n = f"{self.n:,} {self.unit}" if self.n is not None else "n unknown"
            return f"inconclusive (n = {n})"
        return "unknown"

    @property
    def point(self) -> bool:
        return self.test == POINT_TEST


@dataclass
class VariantQuality:
    """pass / fail / inconclusive / unknown for one variant, with its worst deltas and checks."""

    verdict: str
    reasons: list[str] = field(default_factory=list)
    ppl_delta_pct: float | None = None
    acc_delta_points: float | None = None
    kl_mean: float | None = None
    top1: float | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {
            PASS: "within budget",
            FAIL: "FAILED",
            INCONCLUSIVE: "inconclusive",
            UNKNOWN: "unknown",
        }.get(self.verdict, self.verdict)

    @property
    def positions(self) -> int | None:
        ns = [c.n for c in self.checks if c.unit == "positions" and c.n is not None]
        return sum(ns) if ns else None

    @property
    def documents(self) -> int | None:
        ns = [c.n for c in self.checks if c.unit == "documents" and c.n is not None]
        return sum(ns) if ns else None


def is_reference(run: Run, variant: str | None) -> bool:
    return variant is not None and variant == run.reference


def _ref_quality(run: Run, suite: str) -> QualityRecord | None:
    return next((q for q in run.quality if q.suite == suite and is_reference(run, q.variant)), None)


def _ref_task(run: Run, t: TaskRecord) -> TaskRecord | None:
    for r in run.tasks:
        if is_reference(run, r.variant) and (r.suite, r.task, r.metric) == (
            t.suite,
            t.task,
            t.metric,
        ):
            return r
    return None


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


def _scale(*values: float | None) -> float:
    """Proportions are shown in points (x100); other metrics as they are."""
    vs = [abs(v) for v in values if v is not None]
    return 100.0 if vs and max(vs) <= 1 else 1.0


def task_delta_points(run: Run, t: TaskRecord) -> float | None:
    """Accuracy change against the reference on the same task and metric, in points."""
    if is_reference(run, t.variant):
        return 0.0 if t.value is not None else None
    r = _ref_task(run, t)
    if r is None or t.value is None or r.value is None:
        return None
    return (t.value - r.value) * _scale(t.value, r.value)


def ppl_check(run: Run, q: QualityRecord) -> Check:
    limit_pct = run.budget.max_ppl_increase_pct
    d = ppl_delta_pct(run, q)
    iv = interval(q.ppl_ratio_ci95)
    if iv is not None:
        lo, hi = iv
        limit = 1 + limit_pct / 100
        verdict = FAIL if lo > limit else (PASS if hi <= limit else INCONCLUSIVE)
        ci = (100 * (lo - 1), 100 * (hi - 1))
        return Check("perplexity", q.suite, verdict, d, ci, q.positions, "positions", PPL_TEST)
    verdict = UNKNOWN if d is None else (FAIL if d > limit_pct else PASS)
    return Check("perplexity", q.suite, verdict, d, None, q.positions, "positions", POINT_TEST)


def task_check(run: Run, t: TaskRecord) -> Check:
    budget = run.budget.max_accuracy_drop_points
    ref = _ref_task(run, t)
    if ref is not None and t.doc_scores and ref.doc_scores:
        hib = t.higher_is_better if t.higher_is_better is not None else ref.higher_is_better
        pd = paired_delta(t.doc_scores, ref.doc_scores, True if hib is None else hib)
        scale = _scale(*t.doc_scores.values(), *ref.doc_scores.values())
        mean = pd["delta_mean"] * scale if pd["delta_mean"] is not None else None
        ci = interval(pd["ci95"])
        ci = (ci[0] * scale, ci[1] * scale) if ci is not None else None
        if pd["significant_drop"] and mean is not None and -mean > budget:
            verdict = FAIL
        elif ci is not None and ci[0] >= -budget:
            verdict = PASS
        else:
            verdict = INCONCLUSIVE
        test = TASK_TEST + ("" if hib is not None else "; direction assumed higher is better")
        return Check(
            t.task, t.suite, verdict, mean, ci, pd["n"], "documents", test,
            p=pd["sign_test_p"], worse=pd["worse"], better=pd["better"],
        )  # fmt: skip
    d = task_delta_points(run, t)
    verdict = UNKNOWN if d is None else (FAIL if -d > budget else PASS)
    return Check(t.task, t.suite, verdict, d, None, t.n, "documents", POINT_TEST)


def _reason(c: Check, b: Budget) -> str:
    if c.what == "perplexity":
        d = f"perplexity {c.delta:+.1f}%" if c.delta is not None else "perplexity"
        ci = f" (95% CI {c.ci[0]:+.1f}% to {c.ci[1]:+.1f}%)" if c.ci else ""
        lim = f"budget +{b.max_ppl_increase_pct:g}%"
    else:
        d = f"{c.what} {c.delta:+.1f} pts" if c.delta is not None else c.what
        ci = f" (95% CI {c.ci[0]:+.1f} to {c.ci[1]:+.1f} pts)" if c.ci else ""
        lim = f"budget -{b.max_accuracy_drop_points:g} pts"
    how = ", point comparison" if c.point else ""
    return f"{d}{ci}, {lim}: {c.label}{how}"


def variant_quality(run: Run, v: str) -> VariantQuality:
    b = run.budget
    ppl = [q for q in run.quality if q.variant == v and q.ok]
    tasks = [t for t in run.tasks if t.variant == v and t.ok]
    ref = v == run.reference
    checks = [] if ref else [ppl_check(run, q) for q in ppl] + [task_check(run, t) for t in tasks]
    checks = [c for c in checks if c.verdict != UNKNOWN]
    pd = [x for x in (ppl_delta_pct(run, q) for q in ppl) if x is not None]
    ad = [x for x in (task_delta_points(run, t) for t in tasks) if x is not None]
    qs = [q for q in run.quality if q.variant == v]
    kl = [q.kl_mean for q in qs if q.kl_mean is not None]
    top1 = [q.top1 for q in qs if q.top1 is not None]
    verdicts = {c.verdict for c in checks}
    if FAIL in verdicts:
        verdict = FAIL
        reasons = [_reason(c, b) for c in checks if c.verdict == FAIL]
    elif ref:
        verdict, reasons = PASS, ["the reference variant"]
    elif INCONCLUSIVE in verdicts:
        verdict = INCONCLUSIVE
        reasons = [_reason(c, b) for c in checks if c.verdict == INCONCLUSIVE]
    elif checks:
        verdict, reasons = PASS, []
        if not any(c.what == "perplexity" for c in checks):
            reasons.append("perplexity not measured")
        if not any(c.what != "perplexity" for c in checks):
            reasons.append("task accuracy not measured")
        if any(c.point for c in checks):
            reasons.append("point comparison where no interval was recorded")
    else:
        verdict, reasons = UNKNOWN, ["quality not measured for this variant"]
    return VariantQuality(
        verdict=verdict,
        reasons=reasons,
        ppl_delta_pct=max(pd) if pd else None,
        acc_delta_points=min(ad) if ad else None,
        kl_mean=max(kl) if kl else None,
        top1=min(top1) if top1 else None,
        checks=checks,
    )
