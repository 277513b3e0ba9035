"""Thin helpers over transformers' KV cache: one forward, exact rollback."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def forward(model, ids: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
    """Feed 1-D ids after what the cache holds; returns logits (len(ids) or 1, V)."""
    out = model(
        input_ids=ids.view(1, -1),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1 if last_only else 0,
    )
    return out.logits[0]


def truncate(cache, n_tokens: int) -> None:
    """Forget everything after the first n_tokens positions (no-op if it holds fewer)."""
    extra = cache.get_seq_length() - n_tokens
    if extra > 0:
        cache.crop(-extra)


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
