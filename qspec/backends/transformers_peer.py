"""transformers' assisted generation for the same pair: the peer our engine is timed against."""

from __future__ import annotations

import time

import torch

from qspec.engine.loop import sync
from qspec.engine.sampling import Sampler


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


def hf_assisted(target, prompt: torch.Tensor, *, draft_model=None, gamma: int, **run):
    """Assisted generation with a constant schedule of exactly gamma drafts; returns (tokens, seconds).

    With draft_model None it uses transformers' own prompt-lookup drafter (the n-gram peer).
    """
    if draft_model is None:
        return hf_generate(target, prompt, prompt_lookup_num_tokens=gamma, **run)
    gc = draft_model.generation_config
    gc.num_assistant_tokens = gamma
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0
    return hf_generate(target, prompt, assistant_model=draft_model, **run)
