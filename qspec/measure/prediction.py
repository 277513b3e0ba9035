"""Predicted acceptance from teacher-forced distributions (no generation needed).

beta at a position = sum_x min(p(x), q(x)) under sampling, [argmax p == argmax q] under
greedy; alpha_predicted is the mean of beta over positions (DESIGN.md). For greedy cells
a replay of the drafter over the emitted text gives the steps exactly (replay_greedy).
"""

from __future__ import annotations

import torch

from qspec.engine.loop import Step, max_drafts, next_budget
from qspec.engine.sampling import GREEDY, Sampler


def beta(p_logits: torch.Tensor, q_logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """Per-position acceptance probability for rows of target and draft logits."""
    if sampler.greedy:
        return (p_logits.argmax(-1) == q_logits.argmax(-1)).float()
    return torch.minimum(sampler.probs(p_logits), sampler.probs(q_logits)).sum(-1)


def beta_deterministic(
    p_logits: torch.Tensor, proposals: torch.Tensor, sampler: Sampler
) -> torch.Tensor:
    """Same, for a drafter that proposes one token with certainty (q is one-hot)."""
    if sampler.greedy:
        return (p_logits.argmax(-1) == proposals).float()
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
    model = getattr(drafter, "model", None)
    if model is not None:
        q = teacher_forced_logits(model, ids, start)
        return beta(p, q.to(p.device), sampler)
    # A model-free drafter: ask it for its first proposal at each position; skip where it has none.
    betas = []
    for pos in range(start, ids.numel()):
        proposal, _ = drafter.propose(ids[:pos], 1, sampler, None)
        if proposal.numel():
            betas.append(
                beta_deterministic(p[pos - start : pos - start + 1], proposal[:1], sampler)
            )
    return torch.cat(betas) if betas else torch.empty(0)


@torch.inference_mode()
def replay_greedy(
    drafter,
    prompt: torch.Tensor,
    emitted: list[int],
    gamma: int,
    max_new_tokens: int,
    draft_length: str = "fixed",
    threshold: float = 0.4,
    capacity: int = 0,
) -> list[Step]:
    """The steps a greedy speculative run over this output must have taken, without the target.

    Under greedy decoding the target's tokens are the emitted ones, so each step accepts the
    longest prefix of the drafter's proposal that matches them. The drafter is driven through
    the same calls as in the engine (prefill, propose, rollback), so a deterministic drafter
    proposes exactly what it proposed then: the replayed steps must equal the measured ones.
    Step times are zero.
    """
    n_prompt, total = prompt.numel(), len(emitted)
    ids = torch.cat([prompt, torch.tensor(emitted, dtype=prompt.dtype, device=prompt.device)])
    # the cache as large as the engine's was: a quantized draft is not invariant to the
    # attention's length either (masked positions change the kernel's blocking)
    capacity = max(capacity, n_prompt + max_new_tokens + max_drafts(draft_length, gamma) + 1)
    drafter.prefill(ids[: n_prompt + 1], capacity)
    history = prompt.tolist() + emitted[:1]
    done, steps, schedule = 1, [], gamma
    stop_below = threshold if draft_length == "confidence" else None
    while done < total:
        budget = min(schedule, max_new_tokens - done - 1)
        proposal = []
        if budget > 0:
            draft, _ = drafter.propose(
                ids[: n_prompt + done], budget, GREEDY, None, history=history, stop_below=stop_below
            )
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
        schedule = next_budget(draft_length, schedule, gamma, k, n)
        history.extend(emitted[done : done + e])
        done += e
        drafter.rollback(n_prompt + done - 1)
    return steps
