"""transformers' generate and assisted generation for the same pair: the peer qspec's loop is
timed against (hf_assisted cells), with transformers' own prompt lookup as the n-gram peer,
and transformers' plain generate (hf_target_only), which the peer's own speedups are over.

Its acceptance is counted too, so the peer is an acceptance peer and not only a clock: each
assisted step's candidates and matches are read where transformers' loop hands them to its
candidate generator (get_candidates, update_candidate_strategy), in target tokens.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import torch

from qspec.backends.interface import Counted, Prepared, Timed
from qspec.engine.cross_tokenizer import CrossTokenizerDrafter
from qspec.engine.loop import Step, sync
from qspec.engine.sampling import Sampler
from qspec.models.precisions import MODEL_FREE_DRAFTER_NAMES
from qspec.records import Skip
from qspec.suites.encoding import stop_ids


@torch.inference_mode()
def hf_generate(
    target,
    prompt: torch.Tensor,
    *,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    seed: int,
    pad_id: int | None,
    **assist,
) -> tuple[list[int], float]:
    """transformers' generate with the same sampling transform as qspec; returns (tokens, seconds)."""
    if sampler.greedy:
        kwargs = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs = dict(
            do_sample=True,
            temperature=sampler.temperature,
            top_k=sampler.top_k,
            top_p=sampler.top_p,
        )
    torch.manual_seed(seed)
    ids = prompt.view(1, -1)
    sync(prompt.device)
    start = time.perf_counter()
    out = target.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=pad_id,
        **kwargs,
        **assist,
    )
    sync(prompt.device)
    return out[0, ids.shape[1] :].tolist(), time.perf_counter() - start


def hf_assisted(
    target,
    prompt: torch.Tensor,
    *,
    draft_model=None,
    gamma: int,
    tokenizers=None,
    counted: Counted | None = None,
    **run,
):
    """Assisted generation with a constant schedule of exactly gamma drafts; returns (tokens, seconds).

    With draft_model None it uses transformers' own prompt-lookup drafter (the n-gram peer).
    tokenizers (target's, draft's) make it universal assisted generation, for a draft whose
    tokenizer differs from the target's. counted, if given, receives every step.
    """
    if draft_model is None:
        assist = dict(prompt_lookup_num_tokens=gamma)
    else:
        gc = draft_model.generation_config
        gc.num_assistant_tokens = gamma
        gc.num_assistant_tokens_schedule = "constant"
        gc.assistant_confidence_threshold = 0.0
        assist = dict(assistant_model=draft_model)
        if tokenizers is not None:
            assist.update(tokenizer=tokenizers[0], assistant_tokenizer=tokenizers[1])
    if counted is None:
        return hf_generate(target, prompt, **assist, **run)
    with _counting(target, draft_model, counted, sampled=not run["sampler"].greedy):
        return hf_generate(target, prompt, **assist, **run)


@contextmanager
def _counting(target, draft_model, counted: Counted, sampled: bool):
    """Count each assisted step on this call's candidate generator, and the draft model's own
    decoded tokens. The wrappers cost a shape read and an append per step; a sampled step also
    takes sum_x min(p, q) at its tested drafts (two softmaxes over them, against a forward)."""
    build = target._get_candidate_generator

    def candidate_generator(*args, **kwargs):
        gen = build(*args, **kwargs)
        get, update = gen.get_candidates, gen.update_candidate_strategy
        proposed, q_logits = [0], [None]

        def get_candidates(input_ids, **kw):
            out = get(input_ids, **kw)
            proposed[0], q_logits[0] = out[0].shape[1] - input_ids.shape[1], out[1]
            return out

        def update_candidate_strategy(input_ids, scores, num_matches):
            n = int(num_matches)  # after transformers cut the step at an EOS or the length
            nan = float("nan")  # the peer's draft and verify times are not separable
            counted.steps.append(Step(proposed[0], n, n + 1, nan, nan))
            if sampled and q_logits[0] is not None and proposed[0]:  # p, q as its test saw them
                counted.overlaps += _overlaps(scores, q_logits[0], min(n + 1, proposed[0]))
            return update(input_ids, scores, num_matches)

        gen.get_candidates = get_candidates
        gen.update_candidate_strategy = update_candidate_strategy
        return gen

    target._get_candidate_generator = candidate_generator
    if draft_model is not None:
        draft_generate = draft_model.generate

        def generate(*args, **kwargs):
            out = draft_generate(*args, **kwargs)
            fed = kwargs.get("input_ids")
            if fed is not None and hasattr(out, "sequences"):
                counted.draft_model_tokens += out.sequences.shape[1] - fed.shape[1]
            return out

        draft_model.generate = generate
    try:
        yield
    finally:
        del target._get_candidate_generator
        if draft_model is not None:
            del draft_model.generate


def _overlaps(p_logits: torch.Tensor, q_logits: torch.Tensor, tested: int) -> list[float]:
    """sum_x min(p, q) at the first `tested` draft positions (a shorter vocabulary padded)."""
    p = p_logits[0, :tested].float().softmax(-1)
    q = q_logits[0, :tested].to(p.device).float().softmax(-1)
    width = min(p.shape[-1], q.shape[-1])
    return torch.minimum(p[:, :width], q[:, :width]).sum(-1).tolist()


def prepare(ctx, cell, target, drafter, prompts) -> Prepared:
    """Assisted generation with the cell's draft model (or prompt lookup for an n-gram cell);
    plain generate for a cell without a draft (hf_target_only)."""
    draft_model = drafter.model if drafter is not None else None
    alone = cell.draft is None
    if draft_model is None and not alone and cell.draft not in MODEL_FREE_DRAFTER_NAMES:
        raise Skip("unavailable", "no draft model")
    tokenizer = ctx.models.tokenizer
    eos = stop_ids(tokenizer, target)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    cross = isinstance(drafter, CrossTokenizerDrafter)
    tokenizers = (drafter.target_tok, drafter.draft_tok) if cross else None
    sampler = ctx.sampler(cell.mode)
    if cross and not sampler.greedy:
        # Sampled across tokenizers, transformers (universal speculative decoding) prunes the
        # draft's embeddings and LM head to the shared vocabulary in place, and caches that per
        # tokenizer pair: this cell gets its own copies, so qspec's cells keep the draft intact.
        draft_model, tokenizers = copy.deepcopy(draft_model), copy.deepcopy(tokenizers)
    run = dict(
        draft_model=draft_model,
        tokenizers=tokenizers,
        gamma=cell.gamma,
        sampler=sampler,
        eos_ids=eos,
        pad_id=pad,
    )
    if alone:
        run = dict(sampler=sampler, eos_ids=eos, pad_id=pad)
    generate = hf_generate if alone else hf_assisted
    first = prompts[0]
    for _ in range(ctx.cfg.warmup):
        generate(target, first.ids, max_new_tokens=min(8, first.max_new_tokens), seed=0, **run)

    def one(i: int, repeat: int) -> Timed:
        p = prompts[i]
        counted = None if alone else Counted()
        extra = {} if alone else {"counted": counted}
        resident = ctx.memory.reset()
        toks, secs = generate(
            target,
            p.ids,
            max_new_tokens=p.max_new_tokens,
            seed=ctx.cfg.seed + i,
            **extra,
            **run,
        )
        rise, own = ctx.memory.rise(resident)
        return Timed(i, repeat, toks, secs, None, rise, counted, memory_reset=own)

    return Prepared(run=one)
