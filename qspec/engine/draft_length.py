"""How many tokens to draft each step: one policy object, read by the engine and by the greedy
replay alike, so both take exactly the same steps.

Torch-free: the config validates draft-length names against DRAFT_LENGTHS.

    fixed       gamma every step
    confidence  up to gamma, stopping at the first draft token whose probability under the
                draft is below the threshold (transformers' dynamic schedule uses 0.4)
    heuristic   start at gamma; +2 after a step that accepted every draft, -1 otherwise
                (transformers' "heuristic" schedule), between 1 and 2 * gamma
"""

from __future__ import annotations

from dataclasses import dataclass

DRAFT_LENGTHS = ("fixed", "confidence", "heuristic")


@dataclass(frozen=True)
class DraftLength:
    kind: str = "fixed"
    gamma: int = 0
    threshold: float = 0.4  # confidence stopping only

    def __post_init__(self) -> None:
        if self.kind not in DRAFT_LENGTHS:
            raise ValueError(f"draft length {self.kind!r} (allowed: {', '.join(DRAFT_LENGTHS)})")

    @property
    def widest(self) -> int:
        """The most drafts any step can ask for: the caches and compiled shapes are sized by it."""
        return 2 * self.gamma if self.kind == "heuristic" else self.gamma

    @property
    def stop_below(self) -> float | None:
        """The draft probability under which drafting stops early; None: never."""
        return self.threshold if self.kind == "confidence" else None

    def next(self, budget: int, drafted: int, accepted: int) -> int:
        """The next step's budget, after a step that drafted and accepted this many."""
        if self.kind != "heuristic" or drafted == 0:
            return budget
        if accepted == drafted == budget:
            return min(budget + 2, self.widest)
        return max(budget - 1, 1)


PLAIN = DraftLength()  # plain decoding: no drafts
