"""Verdict: the pairing to serve within the quality budget, the fastest one regardless, and the
warnings that qualify both (proxy hardware, output that is not lossless, an incomplete run)."""

from __future__ import annotations

from qspec.records import Kind
from qspec.report.analysis import Run
from qspec.report.format import fmt_bytes, text
from qspec.report.pairings import Pairing, pairings

SMALL_MODEL_BYTES = 2 * 1024**3


def build(run: Run) -> dict:
    pairs = pairings(run)
    eligible = [p for p in pairs if p.eligible]
    rec = eligible[0] if eligible else None
    fastest = pairs[0] if pairs and pairs[0].speedup is not None else None
    per_mode = [
        {"mode": m, "best": next((p for p in eligible if p.mode == m), None)} for m in run.modes
    ]
    return {
        "budget": run.budget,
        "recommended": rec,
        "fastest": fastest,
        "same": rec is not None and fastest is not None and rec.label == fastest.label,
        "per_mode": per_mode,
        "throughput": _throughput(run, eligible),
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
        "n_failed": sum(1 for c in run.cells if not c.ok),
        "caption": run.caption(run.spec),
        "slower": rec is not None and rec.speedup is not None and rec.speedup < 1,
    }


def _throughput(run: Run, eligible: list[Pairing]) -> dict | None:
    """Highest absolute throughput within the budget, the target alone included."""
    options = [
        {"label": p.label, "tokens_per_s": p.tokens_per_s, "weights": p.weights} for p in eligible
    ]
    for c in run.ok:
        vq = run.vq.get(c.target)
        if c.kind == Kind.TARGET_ONLY and vq is not None and vq.verdict == "pass":
            options.append(
                {
                    "label": run.label(c),
                    "tokens_per_s": c.tokens_per_s,
                    "weights": run.weights_total(c),
                }
            )
    options = [o for o in options if o["tokens_per_s"] is not None]
    return max(options, key=lambda o: o["tokens_per_s"]) if options else None


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
