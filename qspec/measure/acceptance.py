"""Measured acceptance from the engine's steps, and Leviathan's expectations, as docs/definitions.md
defines them."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Acceptance:
    """What a cell's steps say about its drafts.

    tested = accepted + steps that ended in a rejection: drafts after a step's first rejection
    were never tested. The histogram counts steps by accepted drafts (0..gamma); a step that
    drafted fewer than gamma tokens and accepted them all (an n-gram copy running out, the last
    step) had no rejection, so it is counted apart (short_full_accepts), not in a rejection
    bin. Per-position rates come both ways: conditional (accepted at i / tested at i) and
    vLLM's unconditional one (accepted at i / steps that drafted).
    """

    gamma: int
    steps: int
    drafted: int
    accepted: int
    tested: int
    emitted: tuple[int, ...]  # tokens per step, the bonus or correction token included
    histogram: tuple[int, ...]
    short_full_accepts: int
    drafting_steps: int
    position_tested: tuple[int, ...]
    position_accepted: tuple[int, ...]

    @classmethod
    def of(cls, steps, gamma: int) -> Acceptance:
        hist, reached, passed = [0] * (gamma + 1), [0] * gamma, [0] * gamma
        short_full = rejected = 0
        drafting = [s for s in steps if s.drafted]  # steps with nothing to verify are left out
        for s in drafting:
            rejected += s.accepted < s.drafted
            if s.accepted == s.drafted < gamma:
                short_full += 1
            else:
                hist[min(s.accepted, gamma)] += 1
            for i in range(min(s.drafted, gamma, s.accepted + 1)):
                reached[i] += 1
                passed[i] += i < s.accepted
        accepted = sum(s.accepted for s in steps)
        return cls(
            gamma=gamma,
            steps=len(steps),
            drafted=sum(s.drafted for s in steps),
            accepted=accepted,
            tested=accepted + rejected,
            emitted=tuple(s.emitted for s in steps),
            histogram=tuple(hist),
            short_full_accepts=short_full,
            drafting_steps=len(drafting),
            position_tested=tuple(reached),
            position_accepted=tuple(passed),
        )

    @property
    def alpha(self) -> float | None:
        """Per-token acceptance probability: accepted / tested."""
        return self.accepted / self.tested if self.tested else None

    @property
    def rate(self) -> float | None:
        """vLLM's acceptance rate: accepted / drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tau(self) -> float | None:
        return mean_se(self.emitted)[0]

    def fields(self) -> dict:
        """The record's flat fields (docs/definitions.md names)."""
        tau, tau_se = mean_se(self.emitted)
        return {
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "tested": self.tested,
            "alpha_measured": self.alpha,
            "alpha_measured_ci95": _ci(self.accepted, self.tested),
            "acceptance_rate": self.rate,
            "acceptance_rate_ci95": _ci(self.accepted, self.drafted),
            "tau": tau,
            "tau_se": tau_se,
            "accepted_histogram": list(self.histogram),
            "short_full_accepts": self.short_full_accepts,
            "steps_without_drafts": self.steps - self.drafting_steps,
            "position_acceptance": [
                p / r if r else None
                for p, r in zip(self.position_accepted, self.position_tested, strict=True)
            ],
            "position_tested": list(self.position_tested),
            "position_acceptance_unconditional": [
                p / self.drafting_steps if self.drafting_steps else None
                for p in self.position_accepted
            ],
        }


def exactness(accepted: int, overlaps: list[float]) -> dict:
    """A peer's acceptance against what exact rejection sampling gives on its own p and q:
    each tested draft is accepted with probability sum_x min(p, q) (its overlap), so accepted
    has that sum as its mean and sum o(1 - o) as its variance."""
    if not overlaps:
        return {}
    var = sum(o * (1 - o) for o in overlaps)
    return {
        "peer_alpha_exact": sum(overlaps) / len(overlaps),
        "peer_exact_z": (accepted - sum(overlaps)) / var**0.5 if var > 0 else None,
    }


def _ci(successes: int, n: int) -> list[float] | None:
    return list(wilson(successes, n)) if n else None
