"""The speculative decoding loop under measurement.

The prefill of the prompt gives the first token. Then each step: the drafter proposes
up to gamma tokens, the target scores the last emitted token plus all drafts in ONE
forward pass, the longest acceptable prefix is kept, and one more token comes from the
target (the correction after a rejection, or the bonus token when every draft was
accepted). Both KV caches then roll back to exactly the emitted prefix. gamma = 0 (or
no drafter) is plain autoregressive decoding through the same code, which makes it the
fair baseline.

Sampling follows Leviathan et al. (2023), "Fast Inference from Transformers via
Speculative Decoding": accept draft x with probability min(1, p(x)/q(x)); on
rejection draw from norm(max(0, p - q)). The output distribution is then exactly p.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qspec.engine.kv import new_kv
from qspec.engine.sampling import GREEDY, Sampler


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
    draft_prefill_s: float = 0.0  # the draft's prompt forward, after the first token
    total_s: float = 0.0
    target_kv_bytes: int = 0
    draft_kv_bytes: int = 0
    kv_path: str = ""  # "static" (pre-allocated, pointer rollback) or "dynamic"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    n = (r * q_d <= p_d).int().cumprod(0).sum()
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


AcceptRule = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# How many tokens to draft each step (DraftLength in the config):
#   fixed       gamma every step
#   confidence  up to gamma, stopping at the first draft token whose probability under the
#               draft is below the threshold (transformers' dynamic schedule uses 0.4)
#   heuristic   start at gamma; +2 after a step that accepted every draft, -1 otherwise
#               (transformers' "heuristic" schedule), between 1 and 2 * gamma
LENGTHS = ("fixed", "confidence", "heuristic")


def max_drafts(draft_length: str, gamma: int) -> int:
    return 2 * gamma if draft_length == "heuristic" else gamma


def next_budget(draft_length: str, budget: int, gamma: int, drafted: int, accepted: int) -> int:
    """The next step's draft budget under the heuristic schedule; the others keep gamma."""
    if draft_length != "heuristic" or drafted == 0:
        return budget
    if accepted == drafted == budget:
        return min(budget + 2, max_drafts(draft_length, gamma))
    return max(budget - 1, 1)


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
    compile: bool = False,
    capacity: int = 0,
    draft_length: str = "fixed",
    threshold: float = 0.4,
) -> Generation:
    """Generate up to max_new_tokens after a 1-D prompt, speculatively when a drafter is given.

    The hot loop allocates no per-token Python state on the device side: tokens live in one
    pre-allocated buffer, the caches roll back by moving a pointer, and the only host
    synchronisation per step is the single transfer of (n accepted, emitted tokens).
    capacity sizes the caches when it exceeds what this call needs: a compiled run passes
    the largest over its prompts, so every generation has the same shapes (no recompiles).
    """
    device = prompt.device
    accept = accept or (accept_greedy if sampler.greedy else accept_sample)
    if drafter is None:
        gamma = 0
    n_prompt = prompt.numel()
    widest = max_drafts(draft_length, gamma)
    capacity = max(capacity, n_prompt + max_new_tokens + widest + 1)
    history = prompt.tolist()  # host copy, for drafters that work on token lists
    sync(device)
    start = time.perf_counter()
    kv = new_kv(target, capacity, compile)
    # compiled verify steps keep one shape: always gamma + 1 tokens, the tail past the drafts ignored
    fixed = compile and kv.path == "static"
    ids = torch.zeros(capacity, dtype=prompt.dtype, device=device)  # zeros: valid padding ids
    ids[:n_prompt] = prompt
    first = sampler.pick(kv.forward(prompt, last_only=True)[-1], generator)
    ids[n_prompt] = first
    first = int(first)  # the prefill's one host synchronisation
    prefill_s = time.perf_counter() - start
    gen = Generation(n_prompt, [first], prefill_s=prefill_s, ttft_s=prefill_s, kv_path=kv.path)
    if drafter is not None:  # timed apart, so it inflates neither TTFT nor the first step's draft
        drafter.prefill(ids[: n_prompt + 1], capacity, compile)
        sync(device)
        gen.draft_prefill_s = time.perf_counter() - start - prefill_s
    history.append(first)
    length = n_prompt + 1  # ids[:length] is prompt + emitted; the target cache holds length - 1
    stop = first in eos_ids
    schedule = gamma
    stop_below = threshold if draft_length == "confidence" else None
    while not stop and len(gen.tokens) < max_new_tokens:
        t0 = time.perf_counter()
        budget = min(schedule, max_new_tokens - len(gen.tokens) - 1)
        draft_ids, draft_probs = ids[:0], None
        if budget > 0:
            draft_ids, draft_probs = drafter.propose(
                ids[:length], budget, sampler, generator, history=history, stop_below=stop_below
            )
        k = draft_ids.numel()
        ids[length : length + k] = draft_ids
        sync(device)
        t1 = time.perf_counter()
        width = widest if fixed else k
        logits = kv.forward(ids[length - 1 : length + width])[: k + 1]
        n_dev, out = accept(logits, draft_ids, draft_probs, sampler, generator)
        host = torch.cat([n_dev.view(1), out[: k + 1]]).tolist()  # the step's one sync
        n = host[0]
        emitted = host[1 : n + 2]
        ids[length : length + n + 1] = out[: n + 1]
        kv.rollback(length + n)  # prefix + the last token + the accepted drafts
        length += n + 1
        history.extend(emitted)
        if drafter is not None:
            drafter.rollback(length - 1)
        sync(device)
        t2 = time.perf_counter()
        hit = next((i for i, t in enumerate(emitted) if t in eos_ids), None)
        if hit is not None:  # the step's record counts only what is kept
            emitted = emitted[: hit + 1]
            if hit < n:  # EOS among the accepted drafts: those after it were never needed
                k = n = hit + 1
            stop = True
        gen.steps.append(Step(k, n, len(emitted), t1 - t0, t2 - t1))
        gen.tokens.extend(emitted)
        schedule = next_budget(draft_length, schedule, gamma, k, n)
    gen.total_s = time.perf_counter() - start
    gen.target_kv_bytes = kv.nbytes()
    draft_kv = getattr(drafter, "kv", None)
    gen.draft_kv_bytes = draft_kv.nbytes() if draft_kv is not None else 0
    return gen
