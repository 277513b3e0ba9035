"""transformers' assisted generation for the same pair: the peer our engine is timed against."""

from __future__ import annotations

import time

import torch

from qspec.engine import sync
from qspec.sampling import Sampler


@torch.inference_mode()
def hf_assisted(
    target,
    prompt: torch.Tensor,
    *,
    draft_model=None,
    gamma: int,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    seed: int,
    pad_id: int | None,
) -> tuple[list[int], float]:
    """Run model.generate with a constant schedule of exactly gamma drafts; returns (tokens, seconds).

    With draft_model None it uses transformers' own prompt-lookup drafter (the n-gram peer).
    """
    kwargs = {}
    if draft_model is not None:
        gc = draft_model.generation_config
        gc.num_assistant_tokens = gamma
        gc.num_assistant_tokens_schedule = "constant"
        gc.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = draft_model
    else:
        kwargs["prompt_lookup_num_tokens"] = gamma
    if sampler.greedy:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(
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
    )
    sync(prompt.device)
    return out[0, ids.shape[1] :].tolist(), time.perf_counter() - start
