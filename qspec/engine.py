"""The speculative decoding loop under measurement.

Each step: the drafter proposes up to gamma tokens, the target scores the last
emitted token plus all drafts in ONE forward pass, the longest acceptable prefix is
kept, and one more token comes from the target (the correction after a rejection, or
the bonus token when every draft was accepted). Both KV caches are then cut back to
exactly the emitted prefix. gamma = 0 (or no drafter) is plain autoregressive
decoding through the same code, which makes it the fair baseline.

Sampling follows Leviathan et al. (2023), "Fast Inference from Transformers via
Speculative Decoding": accept draft x with probability min(1, p(x)/q(x)); on
rejection draw from norm(max(0, p - q)). The output distribution is then exactly p.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qspec.kv import cache_bytes, forward, new_cache, truncate
from qspec.sampling import GREEDY, Sampler


@dataclass
class Step:
    drafted: int
    accepted: int
    emitted: int
    draft_s: float
    verify_s: float


@dataclass
class Generation:
    prompt_len: int
    tokens: list[int]  # emitted tokens (prompt excluded)
    steps: list[Step] = field(default_factory=list)
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # start -> first emitted token
    total_s: float = 0.0
    target_kv_bytes: int = 0
    draft_kv_bytes: int = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accept_greedy(target_logits, draft_ids, draft_probs, sampler, generator):
    """Accept while each draft equals the target's argmax; the next token is the argmax after them."""
    best = target_logits.argmax(-1)
    k = draft_ids.numel()
    matches = (best[:k] == draft_ids).int()
    n = int(matches.cumprod(0).sum().item()) if k else 0
    return n, best[n]


def accept_sample(target_logits, draft_ids, draft_probs, sampler, generator):
    """Leviathan rejection sampling; draft_probs None means a deterministic (one-hot) draft."""
    p = sampler.probs(target_logits)  # (k+1, V)
    k = draft_ids.numel()
    if k == 0:
        return 0, torch.multinomial(p[0], 1, generator=generator)[0]
    rows = torch.arange(k, device=p.device)
    p_d = p[rows, draft_ids]
    q_d = draft_probs[rows, draft_ids] if draft_probs is not None else torch.ones_like(p_d)
    r = torch.rand(k, device=p.device, generator=generator)
    ok = (r * q_d <= p_d).int()
    n = int(ok.cumprod(0).sum().item())
    if n == k:
        return n, torch.multinomial(p[k], 1, generator=generator)[0]
    if draft_probs is not None:
        residual = (p[n] - draft_probs[n]).clamp_min(0)
    else:
        residual = p[n].clone()
        residual[draft_ids[n]] = 0
    if residual.sum() <= 0:  # p == q exactly: the rejection had probability 0; fall back to p
        residual = p[n]
    return n, torch.multinomial(residual / residual.sum(), 1, generator=generator)[0]


AcceptRule = Callable[..., tuple[int, torch.Tensor]]


@torch.inference_mode()
def generate(
    target: torch.nn.Module,
    prompt: torch.Tensor,
    *,
    drafter=None,
    gamma: int = 0,
    sampler: Sampler = GREEDY,
    max_new_tokens: int = 64,
    eos_ids: frozenset[int] = frozenset(),
    generator: torch.Generator | None = None,
    accept: AcceptRule | None = None,
) -> Generation:
    """Generate up to max_new_tokens after a 1-D prompt, speculatively when a drafter is given."""
    device = prompt.device
    accept = accept or (accept_greedy if sampler.greedy else accept_sample)
    if drafter is None:
        gamma = 0
    sync(device)
    start = time.perf_counter()
    cache = new_cache(target)
    if prompt.numel() > 1:
        forward(target, prompt[:-1], cache, last_only=True)
    if drafter is not None:
        drafter.prefill(prompt)
    sync(device)
    gen = Generation(prompt_len=prompt.numel(), tokens=[], prefill_s=time.perf_counter() - start)
    tokens = prompt.clone()
    while len(gen.tokens) < max_new_tokens:
        t0 = time.perf_counter()
        budget = min(gamma, max_new_tokens - len(gen.tokens) - 1)
        if budget > 0:
            draft_ids, draft_probs = drafter.propose(tokens, budget, sampler, generator)
        else:
            draft_ids, draft_probs = tokens.new_empty(0), None
        sync(device)
        t1 = time.perf_counter()
        logits = forward(target, torch.cat([tokens[-1:], draft_ids]), cache)
        n, nxt = accept(logits, draft_ids, draft_probs, sampler, generator)
        new = torch.cat([draft_ids[:n], nxt.view(1)])
        truncate(cache, tokens.numel() + n)  # keep prefix + last token + accepted drafts
        tokens = torch.cat([tokens, new])
        if drafter is not None:
            drafter.rollback(tokens.numel() - 1)
        sync(device)
        t2 = time.perf_counter()
        emitted = new.tolist()
        if not gen.tokens:
            gen.ttft_s = t2 - start
        gen.steps.append(Step(draft_ids.numel(), n, len(emitted), t1 - t0, t2 - t1))
        gen.tokens.extend(emitted)
        stop = next((i for i, t in enumerate(emitted) if t in eos_ids), None)
        if stop is not None:
            del gen.tokens[len(gen.tokens) - len(emitted) + stop + 1 :]
            break
    gen.total_s = time.perf_counter() - start
    gen.target_kv_bytes = cache_bytes(cache)
    gen.draft_kv_bytes = cache_bytes(getattr(drafter, "cache", None))
    return gen
