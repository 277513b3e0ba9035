"""Latency and throughput of a cell's generations."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from qspec.measure.stats import percentile


@dataclass(frozen=True)
class Latency:
    """TTFT, per-token latency (each step's time shared by the tokens it emitted), throughput,
    over every timed generation (every repeat) of a cell."""

    tokens: int
    seconds: float
    ttft: tuple[float, ...]
    e2e: tuple[float, ...]
    per_token: tuple[float, ...]  # the first token comes from the prefill, which is TTFT
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
            per_token=tuple(
                (s.draft_s + s.verify_s) / s.emitted for s in steps for _ in range(s.emitted)
            ),
            decode_tokens=sum(len(g.tokens) - 1 for g in generations),
            decode_s=sum(g.total_s - g.prefill_s for g in generations),
            draft_s=sum(s.draft_s for s in steps),
            verify_s=sum(s.verify_s for s in steps),
            draft_prefill_s=sum(g.draft_prefill_s for g in generations),
            steps_timed=len(steps),
        )

    def fields(self) -> dict:
        """The record's flat fields (DESIGN.md names)."""
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
            "ttft_s_mean": statistics.fmean(self.ttft) if self.ttft else None,
            "ttft_s_p50": percentile(list(self.ttft), 50),
            "token_latency_s_p50": percentile(list(self.per_token), 50),
            "token_latency_s_p95": percentile(list(self.per_token), 95),
            "token_latency_samples": len(self.per_token),
            "e2e_s_p50": percentile(list(self.e2e), 50),
            "decode_tokens_per_s": self.decode_tokens / self.decode_s
            if self.decode_s > 0
            else None,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "draft_prefill_s": self.draft_prefill_s,
            "steps_timed": self.steps_timed,
        }
