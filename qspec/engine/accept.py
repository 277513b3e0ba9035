"""Which drafts the target accepts, computed on the device in one pass over the verify logits.

Sampling follows Leviathan et al. (2023), "Fast Inference from Transformers via Speculative
Decoding": accept draft x with probability min(1, p(x)/q(x)); on rejection draw from
norm(max(0, p - q)). The output distribution is then exactly p.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AcceptRule = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def accept_greedy(target_logits, draft_ids, draft_probs, sampler, generator):
    """Accept while each draft equals the target's argmax; the argmaxes are also the emitted tokens.

    Returns (n, out) as device tensors: n accepted drafts, and out whose first n + 1 entries
    are the tokens this step emits (accepted drafts, then the target's own token).
    """
    best = target_logits.argmax(-1)
    k = draft_ids.numel()
    n = (best[:k] == draft_ids).int().cumprod(0).sum()
    return n, best


def accept_sample(target_logits, draft_ids, draft_probs, sampler, generator):
    """Leviathan rejection sampling on the device; draft_probs None means a one-hot draft."""
    p = sampler.probs(target_logits)  # (k+1, V)
    k, vocab = draft_ids.numel(), p.shape[-1]
    if draft_probs is None:
        q = torch.nn.functional.one_hot(draft_ids, vocab).to(p.dtype)
    else:
        q = draft_probs.to(p.dtype)
    p_d = p[:k].gather(1, draft_ids.view(-1, 1)).squeeze(1)
    q_d = q.gather(1, draft_ids.view(-1, 1)).squeeze(1)
    r = torch.rand(k, device=p.device, generator=generator)
    # strict: r = 0 must not accept a draft the target gives probability 0
    n = (r * q_d < p_d).int().cumprod(0).sum()
    # Row n of max(0, p - q); row k (every draft accepted) is p itself, the bonus token.
    residual = (p - torch.cat([q, q.new_zeros(1, vocab)])).clamp_min(0)
    row = residual.index_select(0, n.view(1))[0]
    total = row.sum()
    # p == q exactly makes the rejection impossible, so that row is never drawn from; keep p there.
    row = torch.where(total > 0, row / total, p.index_select(0, n.view(1))[0])
    nxt = torch.multinomial(row, 1, generator=generator)
    out = torch.cat([draft_ids, nxt])
    out.index_copy_(0, n.view(1), nxt)
    return n, out
