"""Latency and throughput of a cell's generations, named and computed as vLLM's benchmark
names them, so that a figure of qspec's loop and the same figure of a served engine mean the
same thing (docs/definitions.md):

- TTFT: start -> the first token (the prompt's prefill).
- ITL (inter-token latency): the gaps between successive emissions. A speculative step emits
  its accepted drafts and the bonus token together, as one streamed chunk of a server does, so
  each step is one gap, however many tokens it carried (the first gap also carries the draft's
  own prefill, which runs after the first token).
- TPOT (time per output token): per request, (end-to-end - TTFT) / (tokens - 1).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from qspec.measure.stats import percentile, quantiles


def percentiles(values: list[float]) -> dict | None:
    """p50/p95/p99 and mean with the sample count (the Percentiles record part)."""
    if not values:
        return None
    return {**quantiles(values, (50, 95, 99)), "mean": statistics.fmean(values)}


def gaps(generation) -> list[float]:
    """One generation's inter-token gaps: one per step, the draft's prefill in the first."""
    out = [s.draft_s + s.verify_s for s in generation.steps]
    if out:
        out[0] += generation.draft_prefill_s
    return out


def tpot(generation) -> float | None:
    n = len(generation.tokens)
    return (generation.total_s - generation.ttft_s) / (n - 1) if n > 1 else None


@dataclass(frozen=True)
class Latency:
    """TTFT, ITL, TPOT and throughput over every timed generation (every repeat) of a cell."""

    tokens: int
    seconds: float
    ttft: tuple[float, ...]
    e2e: tuple[float, ...]
    itl: tuple[float, ...]  # one per step
    tpot: tuple[float, ...]  # one per generation with two tokens or more
    decode_tokens: int  # after the first token
    decode_s: float  # prefill excluded, the draft's own prefill kept
    draft_s: float
    verify_s: float
    draft_prefill_s: float
    steps_timed: int

    @classmethod
    def of(cls, generations) -> Latency:
        steps = [s for g in generations for s in g.steps]
        return cls(
            tokens=sum(len(g.tokens) for g in generations),
            seconds=sum(g.total_s for g in generations),
            ttft=tuple(g.ttft_s for g in generations),
            e2e=tuple(g.total_s for g in generations),
            itl=tuple(gap for g in generations for gap in gaps(g)),
            tpot=tuple(t for t in map(tpot, generations) if t is not None),
            decode_tokens=sum(len(g.tokens) - 1 for g in generations),
            decode_s=sum(g.total_s - g.prefill_s for g in generations),
            draft_s=sum(s.draft_s for s in steps),
            verify_s=sum(s.verify_s for s in steps),
            draft_prefill_s=sum(g.draft_prefill_s for g in generations),
            steps_timed=len(steps),
        )

    def fields(self) -> dict:
        """The record's flat fields (docs/definitions.md names)."""
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
            "ttft_s_mean": statistics.fmean(self.ttft) if self.ttft else None,
            "ttft_s_p50": percentile(list(self.ttft), 50),
            "itl_s": percentiles(list(self.itl)),
            "tpot_s": percentiles(list(self.tpot)),
            "e2e_s_p50": percentile(list(self.e2e), 50),
            "decode_tokens_per_s": self.decode_tokens / self.decode_s
            if self.decode_s > 0
            else None,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "draft_prefill_s": self.draft_prefill_s,
            "steps_timed": self.steps_timed,
        }
