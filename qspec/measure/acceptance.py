"""Acceptance and latency statistics, with the formulas from DESIGN.md."""

from __future__ import annotations

import math
import statistics

from qspec.measure.stats import mean_se, wilson


def expected_tau(alpha: float, gamma: int) -> float:
    """Leviathan et al. (2023): tokens per verification step, bonus token included."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_acceptance_rate(alpha: float, gamma: int) -> float:
    """Accepted drafts / drafted tokens when every step drafts gamma tokens."""
    if gamma == 0:
        return float("nan")
    return (expected_tau(alpha, gamma) - 1) / gamma


def acceptance(steps, gamma: int) -> dict:
    """Measured acceptance from per-step (drafted, accepted, emitted) records, as DESIGN.md defines it.

    The histogram counts steps by accepted drafts (0..gamma); a step that drafted fewer than
    gamma tokens and accepted them all (an n-gram copy running out, the last step) had no
    rejection, so it is counted apart (`short_full_accepts`), not in a rejection bin.
    Per-position rates come both ways: conditional (accepted at i / tested at i) and vLLM's
    unconditional one (accepted at i / steps that drafted).
    """
    drafted = sum(s.drafted for s in steps)
    accepted = sum(s.accepted for s in steps)
    rejected_steps = sum(1 for s in steps if s.accepted < s.drafted)
    tested = accepted + rejected_steps
    hist = [0] * (gamma + 1)
    short_full = 0
    reached = [0] * gamma  # drafts tested at position i
    passed = [0] * gamma
    drafting = [s for s in steps if s.drafted]  # steps with nothing to verify are left out
    for s in drafting:
        if s.accepted == s.drafted < gamma:
            short_full += 1
        else:
            hist[min(s.accepted, gamma)] += 1
        for i in range(min(s.drafted, gamma)):
            if i > s.accepted:
                break
            reached[i] += 1
            passed[i] += i < s.accepted
    emitted = [s.emitted for s in steps]
    tau, tau_se = mean_se(emitted)
    return {
        "steps": len(steps),
        "drafted": drafted,
        "accepted": accepted,
        "tested": tested,
        "alpha_measured": accepted / tested if tested else None,
        "alpha_measured_ci95": list(wilson(accepted, tested)) if tested else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "acceptance_rate_ci95": list(wilson(accepted, drafted)) if drafted else None,
        "tau": tau,
        "tau_se": tau_se,
        "accepted_histogram": hist,
        "short_full_accepts": short_full,
        "steps_without_drafts": len(steps) - len(drafting),
        "position_acceptance": [p / r if r else None for p, r in zip(passed, reached, strict=True)],
        "position_tested": reached,
        "position_acceptance_unconditional": [
            p / len(drafting) if drafting else None for p in passed
        ],
    }


def spread_of(values: list[float]) -> dict | None:
    """p10/p50/p90 across requests (prompts): how much one request's figure can differ."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {
        "p10": percentile(xs, 10),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "n": len(xs),
    }


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency(generations) -> dict:
    """TTFT, per-token latency (each step's time shared by the tokens it emitted), throughput."""
    per_token, ttft, e2e = [], [], []
    tokens = sum(len(g.tokens) for g in generations)
    seconds = sum(g.total_s for g in generations)
    decode_tokens = sum(len(g.tokens) - 1 for g in generations)
    decode_s = sum(g.total_s - g.prefill_s for g in generations)
    for g in generations:
        ttft.append(g.ttft_s)
        e2e.append(g.total_s)
        for s in g.steps:  # the first token comes from the prefill, which is TTFT
            per_token.extend([(s.draft_s + s.verify_s) / s.emitted] * s.emitted)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "ttft_s_mean": statistics.fmean(ttft) if ttft else None,
        "ttft_s_p50": percentile(ttft, 50),
        "token_latency_s_p50": percentile(per_token, 50),
        "token_latency_s_p95": percentile(per_token, 95),
        "token_latency_samples": len(per_token),
        "e2e_s_p50": percentile(e2e, 50),
        # decode only: after the first token (prefill excluded, the draft's own prefill kept)
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
        "draft_s": sum(s.draft_s for g in generations for s in g.steps),
        "verify_s": sum(s.verify_s for g in generations for s in g.steps),
        "draft_prefill_s": sum(g.draft_prefill_s for g in generations),
        "steps_timed": sum(len(g.steps) for g in generations),  # over every repeat
    }
