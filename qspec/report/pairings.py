"""Serving options: the speculative pairings (target, draft, γ, draft length, mode) of all
suites taken together and each target decoding alone, the units the verdict ranks by absolute
tokens/s per mode."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qspec.records import Kind
from qspec.report.analysis import Run
from qspec.report.budget import FAIL, VariantQuality, variant_quality
from qspec.report.format import interval, text

if TYPE_CHECKING:
    from qspec.records import GenerationRecord


@dataclass
class Pairing:
    """One serving option. A target alone has draft None, γ 0 and speedup 1 by definition."""

    target: str
    draft: str | None
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
    draft_length: str = "fixed"
    draft_skip: list[int] | None = None
    cells: list[GenerationRecord] = field(default_factory=list)
    speedup_ci95: tuple[float, float] | None = None  # one suite: the cell's paired interval
    speedup_pairs: int | None = None
    speedup_decode: float | None = None
    speedup_decode_ci95: tuple[float, float] | None = None
    alpha_ci95: tuple[float, float] | None = None
    tested: int | None = None
    tau_se: float | None = None

    @property
    def alone(self) -> bool:
        return self.draft is None

    @property
    def eligible(self) -> bool:
        return not self.reasons

    @property
    def interval_missing(self) -> bool:
        """A speculative option whose speedup has no interval (older runs, or one prompt)."""
        return not self.alone and self.speedup is not None and self.speedup_ci95 is None

    @property
    def faster(self) -> bool:
        """Shown faster than its target alone: every suite's 95% interval lies above 1 (where
        no interval was recorded, the point estimate: see interval_missing)."""
        if self.alone or not self.cells:
            return False
        for c in self.cells:
            iv = interval(c.speedup_ci95)
            if iv is not None:
                if iv[0] <= 1:
                    return False
            elif c.speedup is None or c.speedup <= 1:
                return False
        return True


def geomean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def pairings(run: Run) -> list[Pairing]:
    """Every speculative pairing, the highest absolute tokens/s first."""
    groups = defaultdict(list)
    for c in run.spec:
        groups[(c.target, text(c.draft), c.gamma, c.mode, c.draft_length)].append(c)
    out = [_pairing(run, *key, cs) for key, cs in groups.items()]
    return sorted(out, key=_by_speed)


def alone(run: Run) -> list[Pairing]:
    """Every target decoding alone (target-only cells of all suites), as a serving option."""
    groups = defaultdict(list)
    for c in run.ok:
        if c.kind == Kind.TARGET_ONLY:
            groups[(c.target, c.mode)].append(c)
    out = [_pairing(run, t, None, 0, m, "fixed", cs) for (t, m), cs in groups.items()]
    return sorted(out, key=_by_speed)


def ranking(run: Run, mode: str) -> list[Pairing]:
    """Every option of one mode, speculative and target alone, by absolute tokens/s."""
    opts = [p for p in pairings(run) + alone(run) if p.mode == mode]
    return sorted(opts, key=_by_speed)


def _by_speed(p: Pairing) -> tuple:
    return (-(p.tokens_per_s if p.tokens_per_s is not None else -1e18), p.label)


def _label(run: Run, target, draft, skip, gamma: int, mode: str, length: str) -> str:
    if draft is None:
        return f"{target} alone, {mode}"
    label = f"{target} + {run.draft_name(draft, skip)} γ={gamma} {mode}"
    return label if length == "fixed" else f"{label} ({length} draft length)"


def _pairing(
    run: Run,
    target: str,
    draft: str | None,
    gamma: int,
    mode: str,
    length: str,
    cs: list[GenerationRecord],
) -> Pairing:
    is_alone = draft is None
    speedup = 1.0 if is_alone else geomean([c.speedup for c in cs])
    tok = sum(c.tokens or 0 for c in cs)
    sec = sum(c.seconds or 0 for c in cs)
    tps = tok / sec if tok and sec else geomean([c.tokens_per_s for c in cs])
    peaks = [c.peak_memory_bytes for c in cs if c.peak_memory_bytes is not None]
    vq = run.vq.get(target) or variant_quality(run, target)
    reasons = []
    if vq.verdict == FAIL:
        reasons.append("target quality outside the budget: " + "; ".join(vq.reasons))
    changed = not is_alone and (target, text(draft)) in run.not_lossless
    if changed:
        reasons.append("output not lossless (see the warning above)")
    one = cs[0] if len(cs) == 1 else None
    skip = cs[0].draft_skip
    lossless = None
    if not is_alone:
        lossless = False if changed else (True if all(c.lossless is True for c in cs) else None)
    return Pairing(
        target=target,
        draft=draft,
        gamma=gamma,
        mode=mode,
        label=_label(run, target, draft, skip, gamma, mode, length),
        speedup=speedup,
        tokens_per_s=tps,
        weights=run.weights_total(cs[0]),
        peak=max(peaks) if peaks else None,
        peak_measure=cs[0].peak_memory_measure,
        alpha=one.alpha_measured if one else None,
        tau=one.tau if one else None,
        quality=vq,
        lossless=lossless,
        reasons=reasons,
        n_suites=len(cs),
        n_prompts=sum(c.n_prompts or 0 for c in cs),
        tokens=tok,
        steps=sum(c.steps or 0 for c in cs),
        draft_length=length,
        draft_skip=skip,
        cells=cs,
        speedup_ci95=interval(one.speedup_ci95) if one and not is_alone else None,
        speedup_pairs=one.speedup_pairs if one else None,
        speedup_decode=None if is_alone else geomean([c.speedup_decode for c in cs]),
        speedup_decode_ci95=interval(one.speedup_decode_ci95) if one else None,
        alpha_ci95=interval(one.alpha_measured_ci95) if one else None,
        tested=one.tested if one else None,
        tau_se=one.tau_se if one else None,
    )
