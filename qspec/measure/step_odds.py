"""Expected steps of a speculative run over a given text, from per-draft odds.

Leviathan's formulas (acceptance.py) assume every step drafts gamma tokens, each accepted
independently with the same alpha. A drafter that sometimes drafts fewer (n-gram lookup with
a short or no match, confidence stopping), drafts more (the heuristic schedule, up to
2 gamma), continues one match across a step (n-gram), or whose later drafts are worse than its
first (a draft head reading its own states) breaks both assumptions. Instead, for each
position t where a step could start, the odds of each draft i of that step are given:

    accept[t][i]  P(draft i is proposed and accepted | drafts 0..i-1 were accepted)
    stop[t][i]    P(draft i is not proposed at all | drafts 0..i-1 were accepted)

and the run is walked exactly as the engine walks it: a step at t with budget b emits the
accepted drafts and one more token, moves to the position after them, and the next step's
budget follows the DraftLength schedule. The expectation over every path gives the expected
number of steps (hence tau = tokens after the first / steps), drafted, accepted and tested
drafts (hence alpha and the acceptance rate) and the per-position conditional acceptance.

Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from qspec.engine.draft_length import DraftLength


@dataclass(frozen=True)
class DraftOdds:
    """Per start position t (index into the emitted tokens: t tokens are out) and draft i."""

    accept: list[list[float]]
    stop: list[list[float]]

    def at(self, table: list[list[float]], t: int, i: int) -> float:
        row = table[t] if t < len(table) else []
        return row[i] if i < len(row) else (1.0 if table is self.stop else 0.0)


@dataclass(frozen=True)
class Expected:
    """Expected totals of a run over one text (or summed over several)."""

    tokens: float  # tokens the steps emitted (every token after the prefill's first)
    steps: float
    drafting_steps: float  # steps that drafted at least one token
    drafted: float
    accepted: float
    tested: float
    position_tested: tuple[float, ...]
    position_accepted: tuple[float, ...]

    def __add__(self, other: Expected) -> Expected:
        width = max(len(self.position_tested), len(other.position_tested))

        def pad(xs):
            return tuple(xs) + (0.0,) * (width - len(xs))

        def add(a, b):
            return tuple(x + y for x, y in zip(pad(a), pad(b), strict=True))

        return Expected(
            self.tokens + other.tokens,
            self.steps + other.steps,
            self.drafting_steps + other.drafting_steps,
            self.drafted + other.drafted,
            self.accepted + other.accepted,
            self.tested + other.tested,
            add(self.position_tested, other.position_tested),
            add(self.position_accepted, other.position_accepted),
        )

    def fields(self) -> dict:
        """tau, alpha and the acceptance rate, and the per-position rates, as predicted."""
        return {
            "tau_predicted": self.tokens / self.steps + 0.0 if self.steps else None,
            "alpha_predicted": self.accepted / self.tested if self.tested else None,
            "acceptance_rate_predicted": self.accepted / self.drafted if self.drafted else None,
            "position_acceptance_predicted": [
                a / t if t else None
                for a, t in zip(self.position_accepted, self.position_tested, strict=True)
            ],
            "steps_predicted": self.steps,
        }

    @classmethod
    def of_steps(cls, steps, width: int) -> Expected:
        """The totals of steps that happened (a greedy replay: exactly what the engine did)."""
        pos_t, pos_a = [0.0] * width, [0.0] * width
        for s in steps:
            for i in range(min(s.drafted, width, s.accepted + 1)):
                pos_t[i] += 1
                pos_a[i] += i < s.accepted
        return cls(
            float(sum(s.emitted for s in steps)),
            float(len(steps)),
            float(sum(1 for s in steps if s.drafted)),
            float(sum(s.drafted for s in steps)),
            float(sum(s.accepted for s in steps)),
            float(sum(s.accepted + (s.accepted < s.drafted) for s in steps)),
            tuple(pos_t),
            tuple(pos_a),
        )


def expected_run(
    odds: DraftOdds, n_tokens: int, length: DraftLength, max_new_tokens: int
) -> Expected:
    """The expected run over a text of n_tokens emitted tokens (the first from the prefill),
    starting with a step at position 1 and budget gamma, as engine/loop.py steps. Filled from
    the end of the text backwards: a step only moves forwards."""
    width = max(length.widest, 1)
    empty = (0.0, 0.0, 0.0, 0.0, 0.0, (0.0,) * width, (0.0,) * width)
    table: dict[tuple[int, int], tuple] = {}

    def after(t: int, budget: int) -> tuple:
        return table[(t, budget)] if t < n_tokens else empty

    for t in range(n_tokens - 1, 0, -1):
        for budget in range(0, length.widest + 1):
            table[(t, budget)] = _step(odds, t, budget, n_tokens, length, max_new_tokens, after)
    steps, drafting, drafted, accepted, tested, pos_t, pos_a = after(1, length.gamma)
    return Expected(max(n_tokens - 1, 0), steps, drafting, drafted, accepted, tested, pos_t, pos_a)


def _step(odds, t, budget, n_tokens, length, max_new_tokens, after) -> tuple:
    """(steps, drafting steps, drafted, accepted, tested, pos_tested, pos_accepted) expected
    from a step at t with this budget to the end of the text."""
    width = max(length.widest, 1)
    asked = max(0, min(budget, max_new_tokens - t - 1))
    left = n_tokens - t  # tokens still to emit: a step never emits more (the text ends)
    totals = [1.0, 0.0, 0.0, 0.0, 0.0, [0.0] * width, [0.0] * width]
    reach = 1.0
    for i in range(asked + 1):
        stop = odds.at(odds.stop, t, i) if i < asked else 1.0
        accept = odds.at(odds.accept, t, i) if i < asked else 0.0
        reject = max(0.0, 1.0 - stop - accept)
        if i < asked:
            totals[5][i] += reach * (1.0 - stop)
            totals[6][i] += reach * accept
        for prob, tested, drafted in (
            (reach * stop, i, i),
            (reach * reject, i + 1, _drafted_after(odds, t, i, asked)),
        ):
            if prob <= 0.0:
                continue
            emitted = min(i + 1, left)
            accepted = min(i, emitted)
            sub = after(t + emitted, length.next(budget, round(drafted), accepted))
            totals[0] += prob * sub[0]
            totals[1] += prob * ((drafted > 0) + sub[1])
            totals[2] += prob * (drafted + sub[2])
            totals[3] += prob * (accepted + sub[3])
            totals[4] += prob * (tested + sub[4])
            for k in range(width):
                totals[5][k] += prob * sub[5][k]
                totals[6][k] += prob * sub[6][k]
        reach *= accept
        if reach <= 0.0:
            break
    return (*totals[:5], tuple(totals[5]), tuple(totals[6]))


def _drafted_after(odds: DraftOdds, t: int, i: int, asked: int) -> float:
    """Expected drafts of a step at t whose draft i was proposed and rejected: i + 1, and each
    later draft while drafting goes on (the drafter proposes before the target verifies)."""
    drafted, going = float(i + 1), 1.0
    for j in range(i + 1, asked):
        going *= 1.0 - odds.at(odds.stop, t, j)
        drafted += going
    return drafted
