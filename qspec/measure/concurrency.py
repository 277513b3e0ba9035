"""Figures of a served engine under load: one concurrency level's throughput and latency
percentiles over its requests (every repeat), and acceptance from the engine's counters.

Torch-free; a request is anything with the fields of backends/vllm_load.Result.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from qspec.measure.speedup import Timing
from qspec.measure.stats import quantiles, ratio_interval, spread_of, wilson


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

    def timings(self) -> list[Timing]:
        """Per (slot, repeat) Timing, TTFT as the prefill: paired across servers by slot."""
        return [
            Timing(r.slot, i, len(r.tokens), r.e2e_s, r.ttft_s)
            for i, rep in enumerate(self.repeats)
            for r in rep
            if r.ok
        ]

    def totals_per_s(self) -> list[float]:
        """Each repeat's output tokens / wall seconds, all requests together."""
        return [
            sum(len(r.tokens) for r in rep if r.ok) / wall
            for rep, wall in zip(self.repeats, self.walls, strict=True)
            if wall > 0
        ]

    def fields(self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> dict:
        done = self.ok()
        totals = self.totals_per_s()
        # geometric mean over repeats and its interval in log space: a throughput is positive,
        # and two repeats give a t interval that would reach below zero
        mean_total, low, high = ratio_interval(totals)
        wall = sum(self.walls)
        out = {
            "failed_requests": sum(1 for rep in self.repeats for r in rep if not r.ok),
            "output_tokens": sum(len(r.tokens) for r in done),
            "output_tokens_per_s": mean_total,
            "output_tokens_per_s_ci95": [low, high] if low is not None else None,
            "tokens_per_s_per_request": statistics.fmean(len(r.tokens) / r.e2e_s for r in done)
            if done
            else None,
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
