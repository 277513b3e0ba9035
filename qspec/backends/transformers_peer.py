"""transformers' generate and assisted generation for the same pair: the peer qspec's loop is
timed against (hf_assisted cells), with transformers' own prompt lookup as the n-gram peer."""

from __future__ import annotations

import time

import torch

from qspec.backends.interface import Prepared, Timed
from qspec.engine.cross_tokenizer import CrossTokenizerDrafter
from qspec.engine.loop import sync
from qspec.engine.sampling import Sampler
from qspec.measure.memory import peak_bytes, reset_peak
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
    target, prompt: torch.Tensor, *, draft_model=None, gamma: int, tokenizers=None, **run
):
    """Assisted generation with a constant schedule of exactly gamma drafts; returns (tokens, seconds).

    With draft_model None it uses transformers' own prompt-lookup drafter (the n-gram peer).
    tokenizers (target's, draft's) make it universal assisted generation, for a draft whose
    tokenizer differs from the target's.
    """
    if draft_model is None:
        return hf_generate(target, prompt, prompt_lookup_num_tokens=gamma, **run)
    gc = draft_model.generation_config
    gc.num_assistant_tokens = gamma
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0
    if tokenizers is not None:
        run.update(tokenizer=tokenizers[0], assistant_tokenizer=tokenizers[1])
    return hf_generate(target, prompt, assistant_model=draft_model, **run)


def prepare(ctx, cell, target, drafter, prompts) -> Prepared:
    """Assisted generation with the cell's draft model (or prompt lookup for an n-gram cell)."""
    draft_model = drafter.model if drafter is not None else None
    if draft_model is None and cell.draft not in MODEL_FREE_DRAFTER_NAMES:
        raise Skip("unavailable", "no draft model")
    tokenizer = ctx.models.tokenizer
    eos = stop_ids(tokenizer, target)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    cross = isinstance(drafter, CrossTokenizerDrafter)
    run = dict(
        draft_model=draft_model,
        tokenizers=(drafter.target_tok, drafter.draft_tok) if cross else None,
        gamma=cell.gamma,
        sampler=ctx.sampler(cell.mode),
        eos_ids=eos,
        pad_id=pad,
    )
    first = prompts[0]
    for _ in range(ctx.cfg.warmup):
        hf_assisted(target, first.ids, max_new_tokens=min(8, first.max_new_tokens), seed=0, **run)

    def one(i: int, repeat: int) -> Timed:
        p = prompts[i]
        resident = reset_peak(ctx.device)
        toks, secs = hf_assisted(
            target, p.ids, max_new_tokens=p.max_new_tokens, seed=ctx.cfg.seed + i, **run
        )
        rise = peak_bytes(ctx.device)[0] - resident
        return Timed(i, repeat, toks, secs, None, max(rise, 0))

    return Prepared(run=one)
