"""The speculative decoding loop under measurement.

The prefill of the prompt gives the first token. Then each step: the drafter proposes up to a
budget of tokens, the target scores the last emitted token plus all drafts in ONE forward
pass, the longest acceptable prefix is kept (accept.py), and one more token comes from the
target (the correction after a rejection, or the bonus token when every draft was accepted).
Both KV caches then roll back to exactly the emitted prefix. No drafter is plain
autoregressive decoding through the same code, which makes it the fair baseline.

The hot loop allocates no per-token Python state on the device side: tokens live in one
pre-allocated buffer, the caches roll back by moving a pointer, and the only host
synchronisation per step is the single transfer of (n accepted, emitted tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from qspec.engine.accept import AcceptRule, accept_greedy, accept_sample
from qspec.engine.compiled import Compiled
from qspec.engine.draft_length import PLAIN, DraftLength
from qspec.engine.drafters import Drafter
from qspec.engine.kv import KV, new_kv
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
    draft_model_tokens: int = 0  # a cross-tokenizer draft: tokens it decoded in its own vocabulary


@dataclass
class Sequence:
    """One generation in flight: ids[:length] is prompt + emitted; the target's cache holds
    length - 1 of them (the last emitted token is fed with the next step's drafts)."""

    ids: torch.Tensor  # pre-allocated to the caches' capacity
    length: int
    history: list[int]  # the same tokens on the host, for drafters that work on lists
    kv: KV
    drafter: Drafter | None
    # compiled static verify: always this many drafts' room (one shape: the last emitted token
    # + verify_width ids, drafts first, padding after)
    verify_width: int | None
    started: float  # perf_counter() when the prefill began


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(target, prompt, drafter, capacity: int, compiled, sampler, generator, width: int):
    """The prompt through the target (its last logits give the first token), then through the
    drafter with that token; returns (Sequence, Generation with the prefill timed)."""
    device, n_prompt = prompt.device, prompt.numel()
    sync(device)
    start = time.perf_counter()
    kv = new_kv(target, capacity, compiled)
    ids = torch.zeros(capacity, dtype=prompt.dtype, device=device)  # zeros: valid padding ids
    ids[:n_prompt] = prompt
    layers = drafter.target_layers if drafter is not None else ()
    logits, states = kv.forward_states(prompt, layers, last_only=True)
    first = sampler.pick(logits[-1], generator)
    ids[n_prompt] = first
    first = int(first)  # the prefill's one host synchronisation
    prefill_s = time.perf_counter() - start
    gen = Generation(n_prompt, [first], prefill_s=prefill_s, ttft_s=prefill_s, kv_path=kv.path)
    if drafter is not None:  # timed apart, so it inflates neither TTFT nor the first step's draft
        drafter.prefill(ids[: n_prompt + 1], capacity, states)
        sync(device)
        gen.draft_prefill_s = time.perf_counter() - start - prefill_s
    fixed = width if compiled is not None and kv.path == "static" else None
    seq = Sequence(ids, n_prompt + 1, prompt.tolist() + [first], kv, drafter, fixed, start)
    return seq, gen


def speculative_step(seq: Sequence, budget: int, stop_below, sampler, generator, accept):
    """Draft up to `budget` tokens, verify them in one target forward, keep what is accepted.

    Returns (drafted, accepted, emitted tokens, draft seconds, verify seconds).
    """
    device = seq.ids.device
    t0 = time.perf_counter()
    draft_ids, draft_probs = seq.ids[:0], None
    if budget > 0:
        tokens = seq.ids[: seq.length]
        draft_ids, draft_probs = seq.drafter.propose(
            tokens, budget, sampler, generator, seq.history, stop_below
        )
    k, start = draft_ids.numel(), seq.length
    seq.ids[start : start + k] = draft_ids
    sync(device)
    t1 = time.perf_counter()
    width = seq.verify_width if seq.verify_width is not None else k
    layers = seq.drafter.target_layers if seq.drafter is not None else ()
    logits, states = seq.kv.forward_states(seq.ids[start - 1 : start + width], layers)
    logits = logits[: k + 1]
    n_dev, out = accept(logits, draft_ids, draft_probs, sampler, generator)
    host = torch.cat([n_dev.view(1), out[: k + 1]]).tolist()  # the step's one sync
    n, emitted = host[0], host[1 : host[0] + 2]
    seq.ids[start : start + n + 1] = out[: n + 1]
    seq.kv.rollback(start + n)  # prefix + the last token + the accepted drafts
    seq.length += n + 1
    seq.history.extend(emitted)
    if seq.drafter is not None:  # the target's states of the kept positions, for a head
        seq.drafter.rollback(seq.length - 1, states[: n + 1] if states is not None else None)
    sync(device)
    return k, n, emitted, t1 - t0, time.perf_counter() - t1


def kept_until_eos(k: int, n: int, emitted: list[int], eos_ids) -> tuple[int, int, list[int], bool]:
    """The step as recorded: what follows an EOS is never kept, and drafts accepted after an EOS
    among the accepted ones were never needed. Returns (drafted, accepted, emitted, stop)."""
    hit = next((i for i, t in enumerate(emitted) if t in eos_ids), None)
    if hit is None:
        return k, n, emitted, False
    if hit < n:
        k = n = hit + 1
    return k, n, emitted[: hit + 1], True


@torch.inference_mode()
def generate(
    target: torch.nn.Module,
    prompt: torch.Tensor,
    *,
    drafter: Drafter | None = None,
    length: DraftLength = PLAIN,
    sampler: Sampler = GREEDY,
    max_new_tokens: int = 64,
    eos_ids: frozenset[int] = frozenset(),
    generator: torch.Generator | None = None,
    accept: AcceptRule | None = None,
    compiled: Compiled | None = None,
    capacity: int = 0,
) -> Generation:
    """Generate up to max_new_tokens after a 1-D prompt, speculatively when a drafter is given.

    `length` says how many drafts each step asks for (gamma and its schedule); `compiled` is the
    caller's compiled target step (None: eager). capacity sizes the caches when it exceeds what
    this call needs: a compiled run passes the largest over its prompts, so every generation
    has the same shapes (no recompiles).
    """
    accept = accept or (accept_greedy if sampler.greedy else accept_sample)
    if drafter is None:
        length = PLAIN
    capacity = max(capacity, prompt.numel() + max_new_tokens + length.widest + 1)
    seq, gen = prefill(
        target, prompt, drafter, capacity, compiled, sampler, generator, length.widest
    )
    stop, budget = gen.tokens[0] in eos_ids, length.gamma
    while not stop and len(gen.tokens) < max_new_tokens:
        asked = min(budget, max_new_tokens - len(gen.tokens) - 1)
        k, n, emitted, draft_s, verify_s = speculative_step(
            seq, asked, length.stop_below, sampler, generator, accept
        )
        k, n, emitted, stop = kept_until_eos(k, n, emitted, eos_ids)
        gen.steps.append(Step(k, n, len(emitted), draft_s, verify_s))
        gen.tokens.extend(emitted)
        budget = length.next(budget, k, n)
    gen.total_s = time.perf_counter() - seq.started
    gen.target_kv_bytes = seq.kv.nbytes()
    draft_kv = drafter.kv if drafter is not None else None
    gen.draft_kv_bytes = draft_kv.nbytes() if draft_kv is not None else 0
    gen.draft_model_tokens = getattr(drafter, "model_tokens", 0)
    return gen
