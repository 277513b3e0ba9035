"""Predicted acceptance from teacher-forced distributions (no generation needed).

beta at a position = sum_x min(p(x), q(x)) under sampling, [argmax p == argmax q] under
greedy; alpha_predicted is the mean of beta over positions (docs/definitions.md). For greedy cells
a replay of the drafter over the emitted text gives the steps exactly (replay_greedy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qspec.engine.draft_length import DraftLength
from qspec.engine.drafters import teacher_forced_logits
from qspec.engine.head_drafter import target_states
from qspec.engine.kv import new_kv
from qspec.engine.loop import Step
from qspec.engine.sampling import GREEDY, Sampler
from qspec.measure.acceptance import Acceptance, expected_acceptance_rate, expected_tau
from qspec.measure.cost_model import CostModel
from qspec.measure.stats import mean_se
from qspec.measure.step_odds import DraftOdds, Expected
from qspec.models.precisions import MODEL_FREE_DRAFTER_NAMES, head_kind

AGREEMENT = 0.05  # predicted and measured alpha agree within max(this, 2 standard errors)


def agreement(p_top: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    """Greedy beta: 1 where the two argmaxes agree."""
    return (p_top == q_top).float()


def overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Sampled beta from two rows of (already transformed) probabilities: sum_x min(p, q)."""
    return torch.minimum(p, q).sum(-1)


@torch.inference_mode()
def on_policy_beta(
    target, drafter, ids: torch.Tensor, start: int, sampler: Sampler
) -> torch.Tensor:
    """Per-position beta over ids[start:], the continuation the generation visits, at the
    positions where the drafter proposes (it says what its first draft is drawn from)."""
    return on_policy_betas(target, drafter, ids, start, sampler)[0]


@torch.inference_mode()
def on_policy_betas(
    target, drafter, ids: torch.Tensor, start: int, sampler: Sampler
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """beta at each proposing position, and, under sampling, the acceptance probability of the
    same drafter's drafts had they been its argmax instead of a draw, p(argmax q): vLLM's
    "greedy" draft sampling, whose acceptance is that and not sum min(p, q)."""
    p = teacher_forced_logits(target, ids, start)
    first = drafter.first_draft_q(ids, start, sampler, p.shape[-1])
    q, mask = first.q.to(p.device), first.proposes.to(p.device)
    if sampler.greedy:
        return agreement(p.argmax(-1), q.argmax(-1))[mask], None
    probs = sampler.probs(p)
    greedy_draft = probs.gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1)
    return overlap(probs, q)[mask], greedy_draft[mask]


@dataclass(frozen=True)
class Prediction:
    """Acceptance predicted on the text a cell visited, what it implies, and how it compares
    with the measured acceptance.

    Fixed-gamma model drafts: alpha is the mean of beta over positions and tau and the
    acceptance rate follow from it by Leviathan's formulas (method "iid"). Drafts whose steps
    vary (n-gram lookup, confidence stopping, the heuristic schedule): the run is walked step by
    step (`steps`: greedy, the drafter replayed exactly; sampled, the expected steps from
    per-draft odds, step_odds.py), so that steps without drafts, a match continued across a step
    and budgets other than gamma count as they do in the engine (method "per step").
    """

    alpha: float | None  # None: the walk never tested a draft (a lookup that never matched)
    se: float | None
    positions: int
    mode: str
    length: DraftLength
    steps: Expected | None = None
    how: str = ""  # how the per-step walk was made

    @classmethod
    def of(cls, betas, mode: str, length: DraftLength, steps: Expected | None = None, how=""):
        if steps is not None and steps.steps:
            alpha = steps.accepted / steps.tested if steps.tested else None
            return cls(alpha, None, len(betas), mode, length, steps, how)
        alpha, se = mean_se(betas)
        return None if alpha is None else cls(alpha, se, len(betas), mode, length)

    def fields(self, measured: Acceptance) -> dict:
        on = f"on policy: each prompt + this cell's own {self.mode} output"
        f = {
            "alpha_predicted": self.alpha,
            "alpha_predicted_se": self.se,
            "alpha_predicted_positions": self.positions,
            "alpha_predicted_on": f"{on} (the prefill's token excluded)",
        }
        if self.steps is not None:
            f.update(self.steps.fields())
            f["prediction_method"] = f"per step: {self.how}"
        elif self.length.kind == "fixed":  # Leviathan's expectations hold for a fixed gamma
            gamma = self.length.gamma
            f["tau_predicted"] = expected_tau(self.alpha, gamma)
            f["acceptance_rate_predicted"] = expected_acceptance_rate(self.alpha, gamma)
            f["position_acceptance_predicted"] = [self.alpha] * gamma
            f["prediction_method"] = "iid: Leviathan's formulas from the mean of beta"
        a, n = measured.alpha, measured.tested
        if a is not None and n and self.alpha is not None:
            f["alpha_gap"] = a - self.alpha
            # Confidence stopping tests only the drafts the draft was sure of; predicted per
            # position it has no such selection, so there is no verdict without the per-step walk
            if self.length.kind != "confidence" or self.steps is not None:
                tolerance = max(AGREEMENT, 2 * (a * (1 - a) / n) ** 0.5)
                f["alpha_agrees"] = abs(a - self.alpha) <= tolerance
        return f

    def cost_fields(self, cost: CostModel) -> dict:
        """The predicted speedup from the measured costs and the predicted steps."""
        if self.steps is not None and self.steps.steps:
            e = self.steps
            return cost.fields(e.tokens / e.steps, e.drafted / e.steps, e.drafting_steps / e.steps)
        if self.length.kind == "fixed" and self.alpha is not None:
            gamma = self.length.gamma
            return cost.fields(expected_tau(self.alpha, gamma), float(gamma), 1.0)
        return {}


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


# ----------------------------------------------------------------------------- per-step odds


def iid_odds(betas: list[float], n_tokens: int, width: int) -> DraftOdds:
    """A model draft under sampling, its drafts taken as independent: draft i of a step at t
    is accepted with the on-policy beta of the position it drafts for, t + i (betas[j] is that
    of emitted token j + 1: the prefill's token is never drafted)."""
    beta = [0.0, *betas]
    accept = [
        [beta[t + i] if t + i < len(beta) else 0.0 for i in range(width)] for t in range(n_tokens)
    ]
    return DraftOdds(accept, [[0.0] * width for _ in range(n_tokens)])


@torch.inference_mode()
def confidence_odds(
    target, drafter, ids: torch.Tensor, start: int, sampler: Sampler, width: int, threshold: float
) -> DraftOdds:
    """A model draft under sampling with confidence stopping: at a position, drafting goes on
    with the probability that the drawn token has q(x) >= threshold, and that draft is
    accepted with sum over those x of min(p, q)."""
    p = teacher_forced_logits(target, ids, start)
    q = drafter.first_draft_q(ids, start, sampler, p.shape[-1]).q.to(p.device)
    sure = q >= threshold
    keep = (q * sure).sum(-1).tolist()
    accepted = (torch.minimum(sampler.probs(p), q) * sure).sum(-1).tolist()
    n = len(keep) + 1
    accept = [[0.0] * width] + [
        [accepted[t - 1 + i] if t - 1 + i < len(keep) else 0.0 for i in range(width)]
        for t in range(1, n)
    ]
    stop = [[1.0] * width] + [
        [1.0 - keep[t - 1 + i] if t - 1 + i < len(keep) else 1.0 for i in range(width)]
        for t in range(1, n)
    ]
    return DraftOdds(accept, stop)


@torch.inference_mode()
def lookup_odds(
    target, drafter, ids: torch.Tensor, start: int, sampler: Sampler, width: int
) -> DraftOdds:
    """A model-free drafter (n-gram lookup) under sampling: at each position, the proposal the
    engine's step would make there (a match continued, not a fresh lookup per draft), each
    draft accepted with p(x_i | text, x_<i) from one verify forward of the target per position,
    through the engine's own cache; no draft past the proposal's end."""
    host = ids.tolist()
    kv = new_kv(target, ids.numel() + width + 2)
    kv.forward(ids[: start - 1], last_only=True)
    accept, stop = [[]], [[1.0]]  # the prefill's token is never drafted
    for pos in range(start, ids.numel()):
        proposal, _ = drafter.propose(ids[:pos], width, sampler, None, host[:pos])
        feed = torch.cat([ids[pos - 1 : pos], proposal.to(ids.dtype)])
        logits = kv.forward(feed)
        kv.rollback(pos)
        k = proposal.numel()
        probs = sampler.probs(logits[:k]).gather(1, proposal.view(-1, 1)).squeeze(1)
        accept.append(probs.tolist())
        stop.append([0.0] * k + [1.0])
    return DraftOdds(accept, stop)


def sampled_odds(target, drafter, ids, start, sampler, length: DraftLength, betas) -> DraftOdds:
    """The per-draft odds of a sampled cell's drafter over one generation's text."""
    n_tokens = ids.numel() - start + 1
    if drafter.model is None:
        return lookup_odds(target, drafter, ids, start, sampler, length.widest)
    if length.kind == "confidence":
        return confidence_odds(
            target, drafter, ids, start, sampler, length.widest, length.threshold
        )
    return iid_odds(betas, n_tokens, length.widest)


def steps_vary(drafter_name: str, length: DraftLength) -> bool:
    """Whether a cell's steps draft other than gamma tokens each, independently: then tau and
    alpha are predicted per step (step_odds.py), not from Leviathan's fixed-gamma formulas.
    A draft head's later drafts read its own states, not the target's: they are worse than its
    first, so its drafts are not independent either."""
    return (
        length.kind != "fixed"
        or drafter_name in MODEL_FREE_DRAFTER_NAMES
        or head_kind(drafter_name) is not None
    )


@torch.inference_mode()
def head_odds(target, drafter, ids: torch.Tensor, start: int, sampler: Sampler, width: int):
    """A draft head: at each position, its width-step rollout as the engine drafts it (the
    first draft from the target's own states, later ones from the head's), fed the text's
    tokens, which an accepted draft would have been; draft i is accepted with beta at the
    position it drafts for (greedy: argmax agreement, sampled: sum min(p, q))."""
    head = drafter.head
    p = teacher_forced_logits(target, ids, start)  # row j predicts ids[start + j]
    probs = None if sampler.greedy else sampler.probs(p)
    fused = head.fuse(target_states(target, ids[:-1], head.cfg.aux_layers))
    cache = head.new_cache(ids.numel() + width + 1)
    before = start - 2  # entries whose prediction lies before the first predicted token
    if before > 0:
        pos = torch.arange(before, device=ids.device)
        head(ids[1 : before + 1], fused[:before], pos, cache)
    accept = [[]]  # the prefill's token is never drafted
    for t in range(start, ids.numel()):
        cache.rollback(t - 2)
        out, state = head(ids[t - 1 : t], fused[t - 2 : t - 1], torch.tensor([t - 2]), cache)
        row = []
        for i in range(width):
            if t + i >= ids.numel():
                break
            j, q = t + i - start, out[-1]
            if sampler.greedy:
                row.append(float(p[j].argmax() == q.argmax()))
            else:
                row.append(float(overlap(probs[j], sampler.probs(q))))
            if i + 1 < width and t + i + 1 < ids.numel():
                at = torch.tensor([t - 1 + i])
                out, state = head(ids[t + i : t + i + 1], state, at, cache)
        accept.append(row)
    return DraftOdds(accept, [[0.0] * width for _ in accept])
