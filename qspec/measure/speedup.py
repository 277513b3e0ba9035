"""The one definition of a speedup: the geometric mean of paired per-prompt throughput ratios,
with its 95% interval (docs/definitions.md).

Each generation of one run is divided by the other run's generation of the same prompt and
repeat, measured moments apart (the generation stage interleaves them); repeats of a prompt
are averaged (geometric mean), so n is the number of prompts and prompt-to-prompt variation is
in the interval, not hidden by a ratio of two totals timed minutes apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qspec.measure.stats import ratio_interval


@dataclass(frozen=True)
class Timing:
    """One timed generation, as any backend measures it."""

    prompt: int
    repeat: int
    tokens: int
    seconds: float
    prefill_s: float | None = None  # None: the backend does not time its prefill apart

    def rate(self, decode_only: bool) -> float | None:
        """Tokens per second; decode only: after the first token, the prefill excluded."""
        if not decode_only:
            return self.tokens / self.seconds if self.seconds > 0 else None
        if self.prefill_s is None:
            return None
        seconds = self.seconds - self.prefill_s
        return (self.tokens - 1) / seconds if seconds > 0 and self.tokens > 1 else None


@dataclass(frozen=True)
class PairedRatio:
    """Per-prompt ratios of one run over another and their geometric mean with a 95% interval."""

    ratios: tuple[float, ...]

    @classmethod
    def of(cls, num: list[Timing], den: list[Timing], decode_only: bool = False):
        """None when no prompt has a rate in both runs."""
        by = {(t.prompt, t.repeat): t.rate(decode_only) for t in den}
        logs: dict[int, list[float]] = {}
        for t in num:
            a, b = t.rate(decode_only), by.get((t.prompt, t.repeat))
            if a and b:
                logs.setdefault(t.prompt, []).append(math.log(a / b))
        if not logs:
            return None
        return cls(tuple(math.exp(sum(xs) / len(xs)) for xs in logs.values()))

    @property
    def mean(self) -> float:
        return ratio_interval(self.ratios)[0]

    @property
    def ci95(self) -> list[float] | None:
        _, low, high = ratio_interval(self.ratios)
        return [low, high] if low is not None else None

    def fields(self, name: str) -> dict:
        """name, name_ci95, name_pairs: the record's flat fields for this ratio."""
        return {name: self.mean, f"{name}_ci95": self.ci95, f"{name}_pairs": len(self.ratios)}


def paired_fields(num: list[Timing], den: list[Timing], name: str) -> dict:
    """End-to-end and decode-only ratios of two runs as record fields (name, name_decode)."""
    out = {}
    for field, decode_only in ((name, False), (f"{name}_decode", True)):
        ratio = PairedRatio.of(num, den, decode_only)
        if ratio is not None:
            out.update(ratio.fields(field))
    return out
