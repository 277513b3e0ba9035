"""Figures of a served engine under load: one concurrency level's throughput and latency
percentiles over its requests (every repeat), acceptance from the engine's counters, and the
speedup of a pairing over the target alone, paired by repeat.

The unit of a served comparison is the repeat, not the request: the requests of one level run
in the same batches (at c = 4 four of them share every forward), so they are not independent
samples, and a t interval over requests would be too narrow. A level's pass is paired with the
target alone's pass of the same repeat (the two servers alternate within a repeat, so drift
hits both), and the interval is Student's t on the log ratios over repeats (n = repeats).
A bootstrap over repeats is no better here: with 2 or 3 repeats it has 3 or 10 distinct
resamples and an interval narrower than t's, which accounts for so few samples.

Torch-free; a request is anything with the fields of backends/vllm_load.Result.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from qspec.measure.speedup import Timing
from qspec.measure.stats import quantiles, ratio_interval, spread_of, t975, wilson


def percentiles(values: list[float]) -> dict | None:
    """p50/p95/p99 and mean of a latency, with its sample count (the Percentiles record part)."""
    if not values:
        return None
    return {**quantiles(values, (50, 95, 99)), "mean": statistics.fmean(values)}


@dataclass(frozen=True)
class LevelLoad:
    """One level measured over several repeats: each repeat's requests and wall time."""

    repeats: tuple[tuple, ...]  # per repeat: the requests (Result-like)
    walls: tuple[float, ...]  # per repeat: first send to last answer, seconds

    def ok(self) -> list:
        return [r for rep in self.repeats for r in rep if r.ok]

    def totals_per_s(self) -> list[float | None]:
        """Each repeat's output tokens / wall seconds, all requests together (None: no wall)."""
        return [
            sum(len(r.tokens) for r in rep if r.ok) / wall if wall > 0 else None
            for rep, wall in zip(self.repeats, self.walls, strict=True)
        ]

    def request_rates(self, decode_only: bool = False) -> list[float | None]:
        """Each repeat's mean per-request tokens/s (tokens / e2e; decode only: 1 / TPOT, TTFT
        as the prefill), the arithmetic mean over the repeat's requests (None: none has one)."""
        out = []
        for rep in self.repeats:
            rates = [
                Timing(r.slot, 0, len(r.tokens), r.e2e_s, r.ttft_s).rate(decode_only)
                for r in rep
                if r.ok
            ]
            rates = [x for x in rates if x]
            out.append(statistics.fmean(rates) if rates else None)
        return out

    def fields(self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> dict:
        done = self.ok()
        # geometric means over repeats (intervals in log space: a throughput is positive, and
        # two repeats give a t interval that would reach below zero); the paired ratios of
        # paired_by_repeat are then exactly the ratios of these means
        mean_total, low, high = ratio_interval([x for x in self.totals_per_s() if x])
        wall = sum(self.walls)
        out = {
            "failed_requests": sum(1 for rep in self.repeats for r in rep if not r.ok),
            "output_tokens": sum(len(r.tokens) for r in done),
            "output_tokens_per_s": mean_total,
            "output_tokens_per_s_ci95": [low, high] if low is not None else None,
            "tokens_per_s_per_request": ratio_interval([x for x in self.request_rates() if x])[0],
            "requests_per_s": len(done) / wall if wall > 0 else None,
            "ttft_s": percentiles([r.ttft_s for r in done]),
            "tpot_s": percentiles([r.tpot_s for r in done if r.tpot_s is not None]),
            "itl_s": percentiles([gap for r in done for gap in r.itl_s]),
            "e2e_s": percentiles([r.e2e_s for r in done]),
            "tokens_per_chunk": sum(len(r.tokens) for r in done)
            / max(1, sum(len(r.chunk_tokens) for r in done))
            if done
            else None,
        }
        specs = [r.spec for r in done if r.spec and r.spec.get("num_draft_tokens")]
        if specs:  # the engine's own per-request counts: how much one request's acceptance varies
            out["per_request_acceptance_rate"] = spread_of(
                [s["num_accepted_draft_tokens"] / s["num_draft_tokens"] for s in specs]
            )
            out["per_request_acceptance_length"] = spread_of(
                [s.get("mean_acceptance_length") for s in specs]
            )
        if slo_ttft_s is not None or slo_tpot_s is not None:
            good = [r for r in done if _within(r, slo_ttft_s, slo_tpot_s)]
            out["goodput_requests_per_s"] = len(good) / wall if wall > 0 else None
            out["slo"] = {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s}
        return out


def paired_by_repeat(load: LevelLoad, baseline: LevelLoad) -> dict:
    """A pairing's level over the target alone's, repeat by repeat: the ratio of each repeat's
    total output tokens/s (throughput_ratio), of its mean per-request tokens/s (speedup) and of
    its mean per-request 1/TPOT (speedup_decode); each the geometric mean of the per-repeat
    ratios with a t interval on their logs, n = repeats paired (repeat i with repeat i)."""
    out: dict = {}
    n = 0
    for name, mine, theirs in (
        ("throughput_ratio", load.totals_per_s(), baseline.totals_per_s()),
        ("speedup", load.request_rates(), baseline.request_rates()),
        ("speedup_decode", load.request_rates(True), baseline.request_rates(True)),
    ):
        ratios = [a / b for a, b in zip(mine, theirs, strict=False) if a and b]
        if not ratios:
            continue
        mean, low, high = ratio_interval(ratios)
        out[name] = mean
        out[f"{name}_ci95"] = [low, high] if low is not None else None
        out[f"{name}_pairs"] = len(ratios)
        n = max(n, len(ratios))
    if n:
        out["speedup_interval"] = interval_note(n)
    return out


def interval_note(repeats: int) -> str:
    """What stands behind a served speedup interval, in words: n = repeats, and how wide."""
    if repeats < 2:
        return "n = 1 repeat paired: no interval (one ratio)"
    df = repeats - 1
    note = f"n = {repeats} repeats paired, t with {df} degree{'s' if df > 1 else ''} of freedom"
    note += f" ({t975(df):.1f})"
    return note + (": a wide interval" if repeats <= 3 else "")


def _within(r, ttft: float | None, tpot: float | None) -> bool:
    if ttft is not None and r.ttft_s > ttft:
        return False
    return tpot is None or r.tpot_s is None or r.tpot_s <= tpot


def engine_acceptance(drafts: int, draft_tokens: int, accepted: int, per_position) -> dict:
    """Acceptance as the engine counted it (vLLM's definitions), as record fields."""
    if draft_tokens <= 0 or drafts <= 0:
        return {"drafts": drafts, "draft_tokens": draft_tokens, "accepted": accepted}
    low, high = wilson(accepted, draft_tokens)
    return {
        "drafts": drafts,
        "draft_tokens": draft_tokens,
        "accepted": accepted,
        "acceptance_rate": accepted / draft_tokens,
        "acceptance_rate_ci95": [low, high],
        "mean_acceptance_length": 1 + accepted / drafts,
        "position_acceptance_unconditional": [a / drafts for a in per_position],
    }
