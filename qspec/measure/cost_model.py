"""What a speculative cell's measured step costs predict: the speedup tau / (gamma c + v)
(docs/definitions.md), and the oracle bound had every step drafted exactly what it accepted."""

from __future__ import annotations

from dataclasses import dataclass


def mean_step_s(steps) -> float | None:
    """Mean seconds per decode step (draft + verify) over the given steps."""
    return sum(s.draft_s + s.verify_s for s in steps) / len(steps) if steps else None


@dataclass(frozen=True)
class CostModel:
    """c = draft time per drafted token / target step and v = verify of a step's drafts /
    target step, both measured over the cell's timed steps that drafted, against its
    baseline's decode step. A step that drafted nothing costs one target step."""

    c: float
    v: float

    @classmethod
    def of(cls, steps, base_step_s: float | None) -> CostModel | None:
        drafting = [s for s in steps if s.drafted]
        if not base_step_s or not drafting:
            return None
        c = sum(s.draft_s for s in drafting) / sum(s.drafted for s in drafting) / base_step_s
        v = sum(s.verify_s for s in drafting) / len(drafting) / base_step_s
        return cls(c, v)

    def fields(self, tau: float, drafted_per_step: float, drafting_share: float) -> dict:
        """tau / (drafted per step * c + v per drafting step + 1 per step without drafts):
        with gamma drafts every step, the definitions page's tau / (gamma c + v)."""
        cost = drafted_per_step * self.c + drafting_share * self.v + (1 - drafting_share)
        return {
            "draft_cost_ratio": self.c,
            "verify_cost_ratio": self.v,
            "speedup_predicted": tau / cost if cost > 0 else None,
        }


def oracle_fields(steps, base_step_s: float | None) -> dict:
    """The decode speed had every step drafted exactly the tokens it went on to accept.

    Built from the cell's own per-step data and measured costs: a step that accepted n
    drafts would have drafted n (all of a full accept), costing n draft steps and one
    verify (n = 0: a plain decode step), and emitted the same n + 1 tokens. The verify
    cost is the cell's measured (gamma+1)-token verify, an upper bound for fewer tokens.
    """
    drafting = [s for s in steps if s.drafted]
    if not drafting or not base_step_s:
        return {}
    per_draft = sum(s.draft_s for s in drafting) / sum(s.drafted for s in drafting)
    verify = sum(s.verify_s for s in drafting) / len(drafting)
    seconds = sum(s.accepted * per_draft + verify if s.accepted else base_step_s for s in steps)
    rate = sum(s.emitted for s in steps) / seconds
    return {"oracle_decode_tokens_per_s": rate, "oracle_speedup_decode": rate * base_step_s}
