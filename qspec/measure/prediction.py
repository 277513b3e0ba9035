"""Predicted acceptance from teacher-forced distributions (no generation needed).

beta at a position = sum_x min(p(x), q(x)) under sampling, [argmax p == argmax q] under
greedy; alpha_predicted is the mean of beta over positions (DESIGN.md). For greedy cells
a replay of the drafter over the emitted text gives the steps exactly (replay_greedy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qspec.engine.cross_tokenizer import CrossTokenizerDrafter
from qspec.engine.draft_length import DraftLength
from qspec.engine.loop import Step
from qspec.engine.sampling import GREEDY, Sampler
from qspec.measure.acceptance import Acceptance, expected_acceptance_rate, expected_tau
from qspec.measure.stats import mean_se

AGREEMENT = 0.05  # predicted and measured alpha agree within max(this, 2 standard errors)


def agreement(p_top: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    """Greedy beta: 1 where the two argmaxes agree."""
    return (p_top == q_top).float()


def overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Sampled beta from two rows of (already transformed) probabilities: sum_x min(p, q)."""
    return torch.minimum(p, q).sum(-1)


def beta(p_logits: torch.Tensor, q_logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """Per-position acceptance probability for rows of target and draft logits."""
    if sampler.greedy:
        return agreement(p_logits.argmax(-1), q_logits.argmax(-1))
    return overlap(sampler.probs(p_logits), sampler.probs(q_logits))


def beta_deterministic(
    p_logits: torch.Tensor, proposals: torch.Tensor, sampler: Sampler
) -> torch.Tensor:
    """Same, for a drafter that proposes one token with certainty (q is one-hot)."""
    if sampler.greedy:
        return agreement(p_logits.argmax(-1), proposals)
    return sampler.probs(p_logits).gather(-1, proposals.view(-1, 1)).squeeze(-1)


@torch.inference_mode()
def teacher_forced_logits(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits predicting ids[start:], from one forward pass over ids[:-1]."""
    logits = model(input_ids=ids[:-1].view(1, -1), use_cache=False).logits[0]
    return logits[start - 1 :]


@torch.inference_mode()
def on_policy_beta(
    target, drafter, ids: torch.Tensor, start: int, sampler: Sampler
) -> torch.Tensor:
    """Per-position beta over ids[start:], the continuation the generation visits."""
    p = teacher_forced_logits(target, ids, start)
    if isinstance(drafter, CrossTokenizerDrafter):  # a draft with a tokenizer of its own
        return _cross_tokenizer_beta(p, drafter, ids, start, sampler)
    if drafter.model is not None:
        q = teacher_forced_logits(drafter.model, ids, start)
        return beta(p, q.to(p.device), sampler)
    # A model-free drafter: ask it for its first proposal at each position; skip where it has none.
    betas = []
    host = ids.tolist()
    for pos in range(start, ids.numel()):
        proposal, _ = drafter.propose(ids[:pos], 1, sampler, None, host[:pos])
        if proposal.numel():
            betas.append(
                beta_deterministic(p[pos - start : pos - start + 1], proposal[:1], sampler)
            )
    return torch.cat(betas) if betas else torch.empty(0)


def _cross_tokenizer_beta(p, drafter, ids: torch.Tensor, start: int, sampler: Sampler):
    """At each position the draft reads the target's text re-tokenized, as in the engine.
    Greedy: the first target token of its string-level proposal; sampled: the overlap of p with
    its distribution restricted to the shared tokens (token-level intersection)."""
    host = ids.tolist()
    drafter.prefill(ids[:start], 2 * ids.numel())
    betas = []
    for pos in range(start, ids.numel()):
        row = p[pos - start : pos - start + 1]
        if sampler.greedy:
            proposal, _ = drafter.propose(ids[:pos], 1, sampler, None, host[:pos])
            if proposal.numel():
                betas.append(beta_deterministic(row, proposal[:1], sampler))
        else:
            q = drafter.shared_probs(host[:pos], sampler).to(row.device)
            betas.append(overlap(sampler.probs(row), q.view(1, -1)))
    return torch.cat(betas) if betas else torch.empty(0)


@dataclass(frozen=True)
class Prediction:
    """alpha predicted on the text a cell visited, what it implies, and how it compares with
    the measured alpha."""

    alpha: float
    se: float | None
    positions: int
    mode: str
    length: DraftLength

    @classmethod
    def of(cls, betas: list[float], mode: str, length: DraftLength) -> Prediction | None:
        alpha, se = mean_se(betas)
        return None if alpha is None else cls(alpha, se, len(betas), mode, length)

    def fields(self, measured: Acceptance) -> dict:
        f = {
            "alpha_predicted": self.alpha,
            "alpha_predicted_se": self.se,
            "alpha_predicted_positions": self.positions,
            "alpha_predicted_on": (
                f"on policy: each prompt + this cell's own {self.mode} output "
                "(the prefill's token excluded)"
            ),
        }
        if self.length.kind == "fixed":  # Leviathan's expectations hold for a fixed gamma
            f["tau_predicted"] = expected_tau(self.alpha, self.length.gamma)
            f["acceptance_rate_predicted"] = expected_acceptance_rate(self.alpha, self.length.gamma)
        a, n = measured.alpha, measured.tested
        if a is not None and n:
            f["alpha_gap"] = a - self.alpha
            # Confidence stopping tests only the drafts the draft was sure of, so its measured
            # alpha is conditional on that choice and the every-position prediction is not its
            # estimate (measured on the default model: 0.92 vs 0.83 predicted): no verdict.
            if self.length.kind != "confidence":
                tolerance = max(AGREEMENT, 2 * (a * (1 - a) / n) ** 0.5)
                f["alpha_agrees"] = abs(a - self.alpha) <= tolerance
        return f


@dataclass(frozen=True)
class Replay:
    """A greedy cell's drafter replayed over its output: the steps it must have taken."""

    steps: tuple[Step, ...]
    exact: bool  # replayed (drafted, accepted, emitted) == measured, step by step

    @classmethod
    def of(cls, replayed: list[Step], measured: list[Step]) -> Replay:
        def counts(steps):
            return [(s.drafted, s.accepted, s.emitted) for s in steps]

        return cls(tuple(replayed), counts(replayed) == counts(measured))

    def fields(self, gamma: int) -> dict:
        rep = Acceptance.of(self.steps, gamma)
        return {"tau_replay": rep.tau, "alpha_replay": rep.alpha, "replay_exact": self.exact}


@torch.inference_mode()
def replay_greedy(
    drafter,
    prompt: torch.Tensor,
    emitted: list[int],
    length: DraftLength,
    max_new_tokens: int,
    capacity: int = 0,
) -> list[Step]:
    """The steps a greedy speculative run over this output must have taken, without the target.

    Under greedy decoding the target's tokens are the emitted ones, so each step accepts the
    longest prefix of the drafter's proposal that matches them. The drafter is driven through
    the same calls as in the engine (prefill, propose, rollback) under the same DraftLength, so
    a deterministic drafter proposes exactly what it proposed then: the replayed steps must
    equal the measured ones. Step times are zero.
    """
    n_prompt, total = prompt.numel(), len(emitted)
    ids = torch.cat([prompt, torch.tensor(emitted, dtype=prompt.dtype, device=prompt.device)])
    # the cache as large as the engine's was: a quantized draft is not invariant to the
    # attention's length either (masked positions change the kernel's blocking)
    capacity = max(capacity, n_prompt + max_new_tokens + length.widest + 1)
    drafter.prefill(ids[: n_prompt + 1], capacity)
    history = prompt.tolist() + emitted[:1]
    done, steps, budget = 1, [], length.gamma
    while done < total:
        asked = min(budget, max_new_tokens - done - 1)
        proposal = []
        if asked > 0:
            tokens = ids[: n_prompt + done]
            draft, _ = drafter.propose(tokens, asked, GREEDY, None, history, length.stop_below)
            proposal = draft.tolist()
        left = total - done
        match = 0
        while match < min(len(proposal), left) and proposal[match] == emitted[done + match]:
            match += 1
        if match == left:  # the output ended (EOS) inside the accepted drafts
            k = n = e = left
        else:
            k, n, e = len(proposal), match, match + 1
        steps.append(Step(k, n, e, 0.0, 0.0))
        budget = length.next(budget, k, n)
        history.extend(emitted[done : done + e])
        done += e
        drafter.rollback(n_prompt + done - 1)
    return steps
