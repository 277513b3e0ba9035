"""Draft heads: the quantization-aware table. Per target precision, the head trained on the
reference target (what users deploy) beside the head trained on that target's own states
(matched), measured in qspec's loop (per-position acceptance, tau, acceptance rate, speedup)
and predicted from rollouts, their difference with its interval, vLLM's per-position rates
for the same heads, and how each head was trained."""

from __future__ import annotations

import math

from qspec.measure.stats import difference_interval, ratio_interval
from qspec.models.precisions import HEAD, HEAD_MATCHED, head_kind
from qspec.records import GenerationRecord, ServingRecord
from qspec.report.analysis import Run, pos
from qspec.report.format import text


def build(run: Run) -> dict | None:
    cells = [c for c in run.spec if head_kind(c.draft) is not None and c.draft_length == "fixed"]
    if not cells and not run.heads:
        return None
    keys = sorted(
        {(c.suite, c.mode, c.gamma) for c in cells},
        key=lambda k: (pos(run.suites, k[0]), pos(run.modes, k[1]), k[2]),
    )
    return {
        "tables": [_table(run, cells, *k) for k in keys],
        "trained": [_trained(h) for h in run.heads],
        "served": _served(run.serving),
        "reference": run.reference,
    }


def _table(run: Run, cells: list[GenerationRecord], suite: str, mode: str, gamma: int) -> dict:
    mine = {
        (c.target, c.draft): c for c in cells if (c.suite, c.mode, c.gamma) == (suite, mode, gamma)
    }
    users = sorted({c.draft for c in mine.values() if head_kind(c.draft) == "user"})
    rows = []
    for t in run.targets:
        ref = mine.get((t, HEAD))
        matched = ref if t == run.reference else mine.get((t, HEAD_MATCHED))
        if ref is None and matched is None and not any((t, u) in mine for u in users):
            continue
        rows.append(
            {
                "target": t,
                "reference_head": ref,
                "matched_head": matched,
                "same": t == run.reference,
                "difference": _difference(matched, ref) if t != run.reference else None,
                "users": [mine.get((t, u)) for u in users],
            }
        )
    return {"suite": suite, "mode": mode, "gamma": gamma, "rows": rows, "users": users}


def _difference(a: GenerationRecord | None, b: GenerationRecord | None) -> dict | None:
    """matched - reference-trained: acceptance rate (Newcombe), tau (its standard errors
    combined) and the speedup ratio (paired per prompt, the two cells interleaved)."""
    if a is None or b is None or not a.drafted or not b.drafted:
        return None
    rate, low, high = difference_interval(a.accepted, a.drafted, b.accepted, b.drafted)
    out = {"rate": rate, "rate_ci95": [low, high]}
    if a.tau is not None and b.tau is not None:
        se = math.hypot(a.tau_se or 0.0, b.tau_se or 0.0)
        out.update(
            tau=a.tau - b.tau, tau_ci95=[a.tau - b.tau - 1.96 * se, a.tau - b.tau + 1.96 * se]
        )
    ratios = [
        x.tokens_per_s / y.tokens_per_s
        for x, y in zip(a.outputs, b.outputs, strict=False)
        if x.id == y.id and x.tokens_per_s and y.tokens_per_s
    ]
    if ratios:
        mean, lo, hi = ratio_interval(ratios)
        out.update(speed=mean, speed_ci95=[lo, hi] if lo is not None else None, speed_n=len(ratios))
    return out


def _trained(h) -> dict:
    held, train = h.heldout or {}, h.training or {}
    depths = sorted(int(k[2:]) for k in held if k.startswith("a_") and not k.endswith("_n"))
    return {
        "h": h,
        "agreement": [(held.get(f"a_{k}"), held.get(f"a_{k}_n")) for k in depths],
        "train": train,
    }


def _served(records: list[ServingRecord]) -> list[dict]:
    """vLLM's per-position rates for head pairings: its unconditional ones (accepted at i /
    drafts) and the conditional ones they imply (accepted at i / accepted at i - 1)."""
    out = []
    for r in records:
        if not r.ok or head_kind(r.draft) is None or not r.drafts:
            continue
        unconditional = list(r.position_acceptance_unconditional)
        conditional = [
            u / prev if prev else None
            for u, prev in zip(unconditional, [1.0, *unconditional[:-1]], strict=True)
        ]
        out.append({"r": r, "conditional": conditional, "label": f"{r.target} + {text(r.draft)}"})
    return out
